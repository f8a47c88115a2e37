"""squad: abstractive question answering on SQuAD v2.0, unanswerable questions included.

The model learns to write the answer, or NO_ANSWER when the context does not hold one; NO_ANSWER
maps back to "" (the official "no answer") in predictions.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DataError
from ..metrics.squad_v2 import squad_v2_scores
from .registry import Record, Splits, Task

NO_ANSWER = "unanswerable"
SAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "squad_v2_sample.json")


def read_squad_v2(path: str) -> list[Record]:
    """Flatten the official SQuAD v2.0 JSON layout (data -> paragraphs -> qas) into one record per question."""
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
        records = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa["answers"]
                    records.append(
                        {
                            "id": qa["id"],
                            "title": article.get("title", ""),
                            "question": qa["question"].strip(),
                            "context": paragraph["context"],
                            "answers": [a["text"] for a in answers],
                            "answer_starts": [a["answer_start"] for a in answers],
                        }
                    )
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass --data with a SQuAD v2.0 JSON file or a Hub dataset id")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a UTF-8 JSON file ({e}); pass a SQuAD v2.0 JSON file")
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not the SQuAD v2.0 layout (data -> paragraphs -> qas; missing {e})")
    return records


def read_hub(dataset_id: str) -> Splits:
    import datasets  # only here: the Hub path needs the network

    loaded = datasets.load_dataset(dataset_id)
    return {
        split: [
            {
                "id": r["id"],
                "title": r["title"],
                "question": r["question"].strip(),
                "context": r["context"],
                "answers": list(r["answers"]["text"]),
                "answer_starts": list(r["answers"]["answer_start"]),
            }
            for r in rows
        ]
        for split, rows in loaded.items()
    }


def split_by_article(records: list[Record], validation_fraction: float, seed: int) -> Splits:
    """Whole articles go to one side, so validation questions never share a context with training ones."""
    titles = sorted({r["title"] for r in records})
    random.Random(seed).shuffle(titles)
    n_val = max(1, round(len(titles) * validation_fraction)) if len(titles) > 1 else 0
    held_out = set(titles[:n_val])
    return {
        "train": [r for r in records if r["title"] not in held_out],
        "validation": [r for r in records if r["title"] in held_out],
    }


def load_splits(data: str, seed: int = 42, validation_fraction: float = 0.1, validation_data: str | None = None,
                **_options) -> Splits:
    if not Path(data).exists() and "/" in data and not data.endswith(".json"):
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
    template="question: {question} context: {context}",
    truncate_field="context",
    target=target,
    answer_span=answer_span,
    answer_from_output=answer_from_output,
    references=lambda record: record["answers"],
    scores=squad_v2_scores,
    main_metric="f1",
    load_splits=load_splits,
)
