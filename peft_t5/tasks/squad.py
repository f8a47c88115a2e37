"""squad: abstractive question answering on SQuAD v2.0, unanswerable questions included.

The model learns to write the answer, or NO_ANSWER when the context does not hold one; NO_ANSWER
maps back to "" (the official "no answer") in predictions.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..metrics.squad_v2 import squad_v2_scores
from .registry import Record, Splits, Task, looks_like_hub_id, read_text, stream_hub, stream_json_lines

NO_ANSWER = "unanswerable"
logger = logging.getLogger(__name__)
SAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "squad_v2_sample.json")


def _record(article: dict, paragraph: dict, qa: dict) -> Record | None:
    """One question as a flat record, or None when a field it needs is missing or empty."""
    context, question, qid = paragraph.get("context"), qa.get("question"), qa.get("id")
    if not all(isinstance(v, str) and v.strip() for v in (context, question, qid)):
        return None
    answers = [] if qa.get("is_impossible") else qa.get("answers")
    if not isinstance(answers, list) or not all(
            isinstance(a, dict) and isinstance(a.get("text"), str) and a["text"].strip()
            and isinstance(a.get("answer_start"), int) for a in answers):
        return None
    if not answers and not qa.get("is_impossible") and "is_impossible" in qa:
        return None  # marked answerable, but no answer given
    title = article.get("title")
    return {"id": qid, "title": title if isinstance(title, str) else "", "question": question.strip(),
            "context": context, "answers": [a["text"] for a in answers],
            "answer_starts": [a["answer_start"] for a in answers]}


def check_squad_layout(path: str) -> None:
    """A table is not SQuAD (read by its name; the JSON itself is read whole, fast, in training)."""
    if path.lower().endswith((".csv", ".tsv", ".txt")):
        raise DataError(f"{path}: a {Path(path).suffix[1:].upper()} file; the squad task reads SQuAD v2.0 JSON "
                        "(data -> paragraphs -> qas, as dev-v2.0.json), or a Hub dataset id")


def read_squad_v2(path: str) -> list[Record]:
    """Flatten the official SQuAD v2.0 JSON layout (data -> paragraphs -> qas) into one record per question.

    Questions with a missing or empty field are skipped and counted; answers whose text is not at
    answer_start in the context are counted and kept (the task is abstractive). Nothing usable: DataError.
    """
    try:
        articles = json.loads(read_text(path, "a SQuAD v2.0 JSON file or a Hub dataset id"))["data"]
        qas = [(article, paragraph, qa) for article in articles for paragraph in article["paragraphs"]
               for qa in paragraph["qas"]]
        if not all(isinstance(x, dict) for triple in qas for x in triple):
            raise TypeError("an article, paragraph or question that is not a JSON object")
    except json.JSONDecodeError as e:  # read_text names a missing, folder or undecodable file itself
        check_squad_layout(path)
        raise DataError(f"{path}: not a UTF-8 JSON file ({e}); pass a SQuAD v2.0 JSON file")
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not the SQuAD v2.0 layout (data -> paragraphs -> qas; {type(e).__name__}: {e})")
    records = [_record(*triple) for triple in qas]
    skipped = [i for i, r in enumerate(records) if r is None]
    records = [r for r in records if r is not None]
    if skipped:
        logger.warning("%s: skipped %d of %d questions with a missing or empty field (first: question %d); "
                       "fix or remove them", path, len(skipped), len(qas), skipped[0])
    if not records:
        raise DataError(f"{path}: none of its {len(qas)} questions is usable (id, question, context and, "
                        "for answerable ones, answers with text and answer_start are needed)")
    misplaced = [r["id"] for r in records if r["answers"] and
                 r["context"][r["answer_starts"][0]:r["answer_starts"][0] + len(r["answers"][0])] != r["answers"][0]]
    if misplaced:
        logger.warning("%s: in %d questions the answer text is not at answer_start in the context (first: id %s); "
                       "kept, but the truncation report cannot follow them", path, len(misplaced), misplaced[0])
    return records


def _flat_record(row: dict) -> Record | None:
    """A record from the flat layout of rajpurkar/squad_v2 (answers: {text: [...], answer_start: [...]}), or None."""
    answers = row.get("answers") if isinstance(row, dict) else None
    if not isinstance(answers, dict):
        return None
    qa = {"id": row.get("id"), "question": row.get("question"),
          "answers": [{"text": t, "answer_start": s} for t, s in zip(answers.get("text") or [], answers.get("answer_start") or [])]}
    return _record({"title": row.get("title")}, {"context": row.get("context")}, qa)


def read_hub(dataset_id: str) -> Splits:
    import datasets  # only here: the Hub path needs the network

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as e:  # network, authentication, unknown id: all the user can act on is the message
        raise DataError(f"{dataset_id}: cannot load this Hub dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "check the id and the network, or pass a local SQuAD v2.0 JSON file")
    return {split: [r for r in map(_flat_record, rows) if r is not None] for split, rows in loaded.items()}


def stream_squad(data: str, **_options) -> Iterator[Record]:
    """Questions one at a time from a JSON-lines file or the train split of a Hub dataset: for data larger than memory."""
    if looks_like_hub_id(data):
        rows = stream_hub(data)
    elif data.endswith(".jsonl"):
        rows = stream_json_lines(data, "a SQuAD JSON-lines file (one question per line) or a Hub dataset id")
    else:
        raise DataError(f"{data}: --streaming reads SQuAD as JSON lines, one question per line in the "
                        "rajpurkar/squad_v2 layout (.jsonl); the nested SQuAD v2.0 JSON fits in memory: drop --streaming")
    skipped = 0
    for number, row in enumerate(rows):
        record = _flat_record(row)
        if record is None:
            if not skipped:  # a stream has no end to report a count at, so the first one is named
                logger.warning("%s: skipped question %d, which lacks id, question, context or answers (text and "
                               "answer_start lists); later ones are skipped without a warning", data, number)
            skipped += 1
            continue
        yield record


def split_by_article(records: list[Record], validation_fraction: float, seed: int) -> Splits:
    """Whole articles go to one side, so validation questions never share a context with training ones.

    A file of one article is split by paragraph instead, and one paragraph by question, said in one line."""
    groups = [("article", lambda r: r["title"]), ("paragraph", lambda r: r["context"]), ("question", lambda r: r["id"])]
    for level, (unit, key) in enumerate(groups):
        names = sorted({key(r) for r in records})
        if len(names) > 1 or level == len(groups) - 1:
            break
    if level:
        logger.warning("only one %s in the data, so whole %ss are held out for validation instead%s",
                       groups[level - 1][0], unit, " (they share their context with training questions)"
                       if unit == "question" else "")
    random.Random(seed).shuffle(names)
    n_val = max(1, round(len(names) * validation_fraction)) if len(names) > 1 else 0
    held_out = set(names[:n_val])
    return {"train": [r for r in records if key(r) not in held_out],
            "validation": [r for r in records if key(r) in held_out]}


def load_splits(data: str, seed: int = 42, validation_fraction: float = 0.1, validation_data: str | None = None,
                **_options) -> Splits:
    if looks_like_hub_id(data):
        return read_hub(data)
    records = read_squad_v2(data)
    if validation_data:
        return {"train": records, "validation": read_squad_v2(validation_data)}
    return split_by_article(records, validation_fraction, seed)


def target(record: Record) -> str:
    return record["answers"][0] if record["answers"] else NO_ANSWER


def answer_span(record: Record) -> tuple[int, int] | None:
    if not record["answers"]:
        return None
    start = record["answer_starts"][0]
    return start, start + len(record["answers"][0])


def answer_from_output(text: str) -> str:
    text = text.strip()
    return "" if text.lower() == NO_ANSWER else text


TASK = Task(
    name="squad",
    default_model="t5-small",
    default_data="rajpurkar/squad_v2",
    sample=SAMPLE,
    template="question: {question} context: {context}",
    truncate_field="context",
    target=target,
    answer_span=answer_span,
    answer_from_output=answer_from_output,
    references=lambda record: record["answers"],
    scores=squad_v2_scores,
    sweep_objective="eval_f1",
    main_metric="f1",
    load_splits=load_splits,
    stream=stream_squad,
    check_layout=check_squad_layout,
    no_answer=NO_ANSWER,
    empty_output="(no answer)",
)
