"""Tokenise a task's records with `datasets.map`: sources cut at the task's truncatable field, targets as labels."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from .tasks import Task

logger = logging.getLogger(__name__)


@dataclass
class TruncationStats:
    examples: int = 0
    truncated: int = 0  # sources longer than max_source_length, cut in the truncatable field
    answer_cut: int = 0  # of those, how many lost the target's span

    def __str__(self) -> str:
        return (f"{self.truncated} of {self.examples} sources truncated to fit; "
                f"the answer was cut away in {self.answer_cut}")


def encode_source(task: Task, record: dict, tokenizer, max_length: int) -> tuple[list[int], bool, bool]:
    """Token ids of the record's source (ending in </s>), whether it was cut, and whether the answer was cut away.

    Everything before the truncatable field (the question) is kept whole; the field is cut at a token boundary.
    """
    field = task.truncate_field
    if field is None:
        ids = tokenizer(task.source(record), truncation=True, max_length=max_length).input_ids
        return ids, len(ids) == max_length, False
    head_template, tail_template = task.template.split("{" + field + "}")
    assert not tail_template, f"task {task.name}: the truncatable field must end the template"
    head = tokenizer(head_template.format(**record), add_special_tokens=False).input_ids
    body = tokenizer(record[field], add_special_tokens=False, return_offsets_mapping=True)
    room = max(max_length - len(head) - 1, 0)  # one for </s>
    if len(body.input_ids) <= room:
        return head + body.input_ids + [tokenizer.eos_token_id], False, False
    span = task.answer_span(record)
    kept_chars = body.offset_mapping[room - 1][1] if room else 0
    answer_cut = span is not None and span[1] > kept_chars
    return head + body.input_ids[:room] + [tokenizer.eos_token_id], True, answer_cut


def encode_batch(task: Task, tokenizer, max_source_length: int, max_target_length: int):
    """The `datasets.map` function (batched) that turns records into input_ids, attention_mask, labels, length."""

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        sources = [encode_source(task, r, tokenizer, max_source_length) for r in rows]
        labels = tokenizer(text_target=[task.target(r) for r in rows], max_length=max_target_length,
                           truncation=True).input_ids
        return {
            "input_ids": [s[0] for s in sources],
            "attention_mask": [[1] * len(s[0]) for s in sources],
            "labels": labels,
            "length": [len(s[0]) for s in sources],
            "truncated": [s[1] for s in sources],
            "answer_cut": [s[2] for s in sources],
        }

    return encode


def tokenize(task: Task, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_source_length: int = 512,
             max_target_length: int = 64) -> tuple[datasets.Dataset, TruncationStats]:
    """A dataset of input_ids, attention_mask, labels and length (for length-grouped batches)."""
    raw = datasets.Dataset.from_list(records)
    encoded = raw.map(encode_batch(task, tokenizer, max_source_length, max_target_length), batched=True,
                      remove_columns=raw.column_names, desc=f"tokenizing {task.name}")
    stats = TruncationStats(len(encoded), sum(encoded["truncated"]), sum(encoded["answer_cut"]))
    return encoded.remove_columns(["truncated", "answer_cut"]), stats


def stream_splits(task: Task, data: str, validation_records: int, seed: int, shuffle_buffer: int,
                  validation_data: str | None = None, **options) -> tuple[datasets.IterableDataset, list[dict]]:
    """A lazily read, buffer-shuffled training stream, and the first `validation_records` records held out
    (or, given `validation_data`, the first ones of that file, and the training stream keeps all of `data`).

    The task reads its own files (same parsing and error messages as without --streaming);
    `datasets` does the rest: skip/take, the shuffle buffer (reshuffled each epoch), sharding across processes.
    """
    stream = datasets.IterableDataset.from_generator(task.stream, gen_kwargs={"data": data, **options})
    if validation_data:
        return stream.shuffle(seed=seed, buffer_size=shuffle_buffer), list(
            itertools.islice(task.stream(validation_data, **options), validation_records))
    held_out = list(stream.take(validation_records))
    return stream.skip(validation_records).shuffle(seed=seed, buffer_size=shuffle_buffer), held_out


def tokenize_stream(task: Task, stream: datasets.IterableDataset, tokenizer: PreTrainedTokenizerBase,
                    max_source_length: int = 512, max_target_length: int = 64) -> datasets.IterableDataset:
    """tokenize() for a stream: records are encoded as the Trainer asks for them, never all at once."""
    encoded = stream.map(encode_batch(task, tokenizer, max_source_length, max_target_length), batched=True)
    return encoded.select_columns(["input_ids", "attention_mask", "labels"])


def seq2seq_collator(tokenizer: PreTrainedTokenizerBase, model=None) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest (rounded up to 8); padded label positions are -100, so never scored."""
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)


@dataclass
class WindowStats:
    questions: int = 0
    windows: int = 0
    split: int = 0  # questions whose context took more than one window
    answers_in_no_window: int = 0  # answerable questions no window holds the whole answer of

    def __str__(self) -> str:
        return (f"{self.questions} questions in {self.windows} windows ({self.split} contexts split into overlapping "
                f"windows); no window holds the whole answer in {self.answers_in_no_window}")


def tokenize_windows(records: list[dict], tokenizer: PreTrainedTokenizerBase, max_source_length: int = 512,
                     doc_stride: int = 128) -> tuple[datasets.Dataset, WindowStats]:
    """Extractive QA's dataset: a row per window (input_ids, attention_mask, start_positions, end_positions,
    length), see extractive.windows."""
    from collections import Counter

    from .extractive import NO_ANSWER_POSITION, answer_chars, windows

    wins = windows(records, tokenizer, max_source_length, doc_stride)
    per_record = Counter(wins.record)
    found = {i for i, s in zip(wins.record, wins.start_positions) if s != NO_ANSWER_POSITION}
    lost = sum(1 for i, r in enumerate(records) if answer_chars(r) is not None and i not in found)
    stats = WindowStats(len(records), len(wins.input_ids), sum(n > 1 for n in per_record.values()), lost)
    return datasets.Dataset.from_list(wins.rows()), stats
