"""jokes: question -> punchline generation from reddit question-answer jokes.

Reads a CSV or JSON/JSON-lines file with Question/Answer columns (any case) or reddit dump records
with title/body, keeps the question-answer jokes and splits them deterministically from a seed.
"""
from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..metrics.text import generation_scores
from .registry import Record, Splits, Task, looks_like_hub_id, reading, stream_hub, stream_json_lines

logger = logging.getLogger(__name__)
SAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "jokes_sample.csv")
_COLUMN_PAIRS = (("question", "answer"), ("title", "body"))


def _read_rows(path: str) -> list[dict]:
    try:
        with reading(path, "a jokes CSV or JSON file"), open(path, encoding="utf-8", newline="") as f:
            if path.endswith(".csv"):
                return list(csv.DictReader(f, strict=True))  # malformed quoting is an error, not a silent misparse
            text = f.read()
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV file ({e})")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines, as reddit dumps come
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: neither JSON nor JSON lines ({e})")
    if isinstance(rows, dict):
        rows = next((v for v in rows.values() if isinstance(v, list)), [rows])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of records with question/answer or title/body fields")
    return rows


def _field_names(path: str, columns) -> tuple[str, str]:
    """The question and answer column of a file, whichever pair it uses (names in any case)."""
    by_lower = {str(k).lower(): k for k in columns}
    pair = next((p for p in _COLUMN_PAIRS if p[0] in by_lower and p[1] in by_lower), None)
    if pair is None:
        raise DataError(f"{path}: record 0 has columns {sorted(by_lower)}; expected Question/Answer or title/body")
    return by_lower[pair[0]], by_lower[pair[1]]


def _record(row: dict, q_key: str, a_key: str) -> Record:
    return {"question": str(row.get(q_key) or "").strip(), "answer": str(row.get(a_key) or "").strip()}


def read_jokes(path: str) -> list[Record]:
    """Every row as {question, answer}, whichever column pair the file uses (names in any case)."""
    rows = _read_rows(path)
    if not rows:
        return []
    q_key, a_key = _field_names(path, rows[0])
    records = [_record(r, q_key, a_key) for r in rows]
    empty = [i for i, r in enumerate(records) if not r["question"] or not r["answer"]]
    if empty:
        logger.warning("%s: skipped %d of %d records with an empty %s or %s (first: record %d); fix or remove them",
                       path, len(empty), len(records), q_key, a_key, empty[0])
    return [r for r in records if r["question"] and r["answer"]]


def _stream_rows(path: str) -> Iterator[dict]:
    """Rows of a CSV or JSON-lines file one at a time, with the same strict CSV parsing as _read_rows."""
    if not path.endswith(".csv"):
        yield from stream_json_lines(path, "a jokes CSV or JSON-lines file")
        return
    with reading(path, "a jokes CSV or JSON-lines file"), open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}: the record after line {reader.line_num} is not valid CSV ({e}); "
                                "fix its quoting")
            yield row


def stream_jokes(data: str, max_question_words: int = 40, max_answer_words: int = 25, **_options) -> Iterator[Record]:
    """The question-answer jokes of a file or Hub dataset, one at a time: for data larger than memory."""
    rows = stream_hub(data) if looks_like_hub_id(data) else _stream_rows(data)
    keys = None
    for row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{data}: a record that is not an object ({str(row)[:60]}); expected question/answer fields")
        keys = keys or _field_names(data, row)
        record = _record(row, *keys)
        if is_qa_joke(record, max_question_words, max_answer_words):
            yield record


def read_hub_jokes(dataset_id: str) -> list[Record]:
    import datasets  # only here: the Hub path needs the network

    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # network, authentication, unknown id: all the user can act on is the message
        raise DataError(f"{dataset_id}: cannot load this Hub dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "check the id and the network, or pass a local jokes CSV")
    records = [{str(k).lower(): str(v or "").strip() for k, v in r.items()} for r in rows]
    return [{"question": r.get("question", r.get("title", "")), "answer": r.get("answer", r.get("body", ""))}
            for r in records]


def is_qa_joke(record: Record, max_question_words: int = 40, max_answer_words: int = 25) -> bool:
    """A question-answer joke: the question ends in '?', both sides are present and short."""
    q, a = record["question"], record["answer"]
    return (q.endswith("?") and bool(a) and len(q.split()) <= max_question_words
            and len(a.split()) <= max_answer_words)


def split_records(records: list[Record], seed: int, validation_fraction: float, test_fraction: float) -> Splits:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    n_val, n_test = round(len(shuffled) * validation_fraction), round(len(shuffled) * test_fraction)
    return {
        "validation": shuffled[:n_val],
        "test": shuffled[n_val:n_val + n_test],
        "train": shuffled[n_val + n_test:],
    }


def load_splits(data: str, seed: int = 42, validation_fraction: float = 0.05, test_fraction: float = 0.05,
                max_question_words: int = 40, max_answer_words: int = 25, **_options) -> Splits:
    records = read_hub_jokes(data) if looks_like_hub_id(data) else read_jokes(data)
    kept = [r for r in records if is_qa_joke(r, max_question_words, max_answer_words)]
    if not kept:
        raise DataError(f"{data}: none of {len(records)} records is a question-answer joke "
                        f"(question ending in '?', answer of at most {max_answer_words} words)")
    return split_records(kept, seed, validation_fraction, test_fraction)


TASK = Task(
    name="jokes",
    default_model="google/flan-t5-large",
    default_data=SAMPLE,
    sample=SAMPLE,
    template="{question}",
    truncate_field=None,
    target=lambda record: record["answer"],
    answer_span=lambda record: None,
    answer_from_output=str.strip,
    references=lambda record: [record["answer"]],
    scores=generation_scores,
    main_metric="rougeL",
    load_splits=load_splits,
    stream=stream_jokes,
)
