"""Extractive QA on T5: the answer as a span of the context, read off a span head, or no answer.

transformers' `T5ForQuestionAnswering` puts a start/end head (`qa_outputs`) on the decoder's last hidden state, the
decoder reading the input shifted right: position i scores input token i. transformers 5 dropped the
question-answering pipeline, so windows and post-processing are written here, after
`examples/pytorch/question-answering/utils_qa.py`:

- a question and its context become one or more windows of `max_length` tokens; a long context is split into
  windows that overlap by `doc_stride` tokens; each token of the context keeps its character offsets;
- T5's tokenizer has no CLS token, so the input begins with a fixed marker, the prompt's own first word
  (`question:`): position 0 stands for "no answer" (a window that does not hold the whole answer points there too);
- an answer is the best-scoring valid start/end pair of the n best starts and ends (both in the context, end not
  before start, at most `max_answer_length` tokens), across the question's windows; it is "" where the null score
  (position 0's start + end) beats it by more than the threshold.

No torch here but in `span_logits`: windows and answers test against hand-made logits in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

QUESTION = "question: {question} context:"  # its first token is the no-answer position
NO_ANSWER_POSITION = 0


@dataclass
class Windows:
    """The model's inputs for a list of records, one row per window, and what maps them back to the records."""
    input_ids: list[list[int]] = field(default_factory=list)
    record: list[int] = field(default_factory=list)  # the record each window belongs to
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # per token: its context chars, or None
    start_positions: list[int] = field(default_factory=list)  # the answer's first and last token; 0: none here
    end_positions: list[int] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per window, as a datasets.Dataset takes them for training."""
        return [{"input_ids": ids, "attention_mask": [1] * len(ids), "start_positions": s, "end_positions": e,
                 "length": len(ids)} for ids, s, e in zip(self.input_ids, self.start_positions, self.end_positions)]


def answer_chars(record: dict) -> tuple[int, int] | None:
    """The first gold answer's character span in the context (found by its text where answer_start is off), or
    None for an unanswerable question (or an answer the context does not hold)."""
    if not record.get("answers"):
        return None
    text, start = record["answers"][0], record["answer_starts"][0]
    if record["context"][start:start + len(text)] != text:
        start = record["context"].find(text)
        if start < 0:
            return None
    return start, start + len(text)


def windows(records: list[dict], tokenizer, max_length: int = 384, doc_stride: int = 128) -> Windows:
    """Each record as windows over its context (overlapping by doc_stride tokens), with the answer's token
    positions in each (NO_ANSWER_POSITION where the window does not hold all of it, or there is none)."""
    if doc_stride >= max_length // 2:
        from .errors import PeftT5Error

        raise PeftT5Error(f"--doc_stride {doc_stride} must be under half of --max_source_length {max_length}; "
                          "lower it")
    encoded = tokenizer([QUESTION.format(question=r["question"]) for r in records], [r["context"] for r in records],
                        truncation="only_second", max_length=max_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    out = Windows()
    for i, ids in enumerate(encoded["input_ids"]):
        index = encoded["overflow_to_sample_mapping"][i]
        sequence = encoded.sequence_ids(i)
        offsets = [tuple(o) if s == 1 and o[1] > o[0] else None for o, s in zip(encoded["offset_mapping"][i], sequence)]
        start, end = token_span(offsets, answer_chars(records[index]))
        out.input_ids.append(ids)
        out.record.append(index)
        out.offsets.append(offsets)
        out.start_positions.append(start)
        out.end_positions.append(end)
    return out


def token_span(offsets: list[tuple[int, int] | None], chars: tuple[int, int] | None) -> tuple[int, int]:
    """The first and last token of a character span, where the window's context holds all of it; else (0, 0)."""
    inside = [k for k, o in enumerate(offsets) if o is not None]
    if chars is None or not inside or offsets[inside[0]][0] > chars[0] or offsets[inside[-1]][1] < chars[1]:
        return NO_ANSWER_POSITION, NO_ANSWER_POSITION
    first = next(k for k in inside if offsets[k][1] > chars[0])
    last = max(k for k in inside if offsets[k][0] < chars[1])
    return first, last


@dataclass
class SpanAnswer:
    text: str  # the best span of the context ("" only where no valid span exists)
    null_margin: float  # the null score minus the best span's score: above the threshold, the answer is ""

    def answer(self, threshold: float = 0.0) -> str:
        return "" if self.null_margin > threshold else self.text

    @property
    def na_score(self) -> float:
        """The margin as the official scorer's no-answer file holds it: finite (JSON has no infinity)."""
        return min(self.null_margin, 1e9)


def best_spans(records: list[dict], wins: Windows, start_logits, end_logits, n_best: int = 20,
               max_answer_length: int = 30) -> list[SpanAnswer]:
    """Per record, the best valid span over its windows and its margin against the null score (utils_qa's
    postprocess_qa_predictions with version_2_with_negative). Logits: one row per window (padding past the
    window's length is never a valid position: its offsets are missing)."""
    best: list[tuple[float, str] | None] = [None] * len(records)
    null = [float("inf")] * len(records)
    for row, index in enumerate(wins.record):
        starts, ends, offsets = np.asarray(start_logits[row]), np.asarray(end_logits[row]), wins.offsets[row]
        null[index] = min(null[index], float(starts[NO_ANSWER_POSITION] + ends[NO_ANSWER_POSITION]))
        top_starts = np.argsort(starts[:len(offsets)])[::-1][:n_best]
        top_ends = np.argsort(ends[:len(offsets)])[::-1][:n_best]
        for s in top_starts:
            for e in top_ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(starts[s] + ends[e])
                if best[index] is None or score > best[index][0]:
                    best[index] = (score, records[index]["context"][offsets[s][0]:offsets[e][1]])
    return [SpanAnswer(b[1], n - b[0]) if b else SpanAnswer("", float("inf")) for b, n in zip(best, null)]


def extractive_scores(records: list[dict], spans: list[SpanAnswer], threshold: float = 0.0) -> dict[str, float]:
    """The official SQuAD v2 scores of the answers at `threshold` (exact, f1, HasAns/NoAns), and the best
    threshold over the null margins (best_exact, best_f1 and their thresholds)."""
    from .metrics.squad_v2 import squad_v2_scores

    references = [r["answers"] for r in records]
    scores = squad_v2_scores([s.answer(threshold) for s in spans], references)
    best = squad_v2_scores([s.text for s in spans], references,
                           na_probs=[s.na_score for s in spans])
    return {**scores, **{k: v for k, v in best.items() if k.startswith("best_")}}


def span_logits(model, tokenizer, wins: Windows, batch_size: int = 32) -> tuple[list, list]:
    """Start and end logits of every window: one forward pass per batch of windows, never generate()."""
    import torch

    device = next(model.parameters()).device
    starts, ends = [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(wins.input_ids), batch_size):
            batch = tokenizer.pad({"input_ids": wins.input_ids[i:i + batch_size]}, return_tensors="pt")
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            starts += list(out.start_logits.float().cpu().numpy())
            ends += list(out.end_logits.float().cpu().numpy())
    model.train(was_training)
    return starts, ends


def answer_records(model, tokenizer, records: list[dict], max_length: int = 384, doc_stride: int = 128,
                   max_answer_length: int = 30, batch_size: int = 32) -> list[SpanAnswer]:
    """Windows, a forward pass, and the best span of each record."""
    wins = windows(records, tokenizer, max_length, doc_stride)
    starts, ends = span_logits(model, tokenizer, wins, batch_size)
    return best_spans(records, wins, starts, ends, max_answer_length=max_answer_length)
