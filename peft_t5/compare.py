"""Side-by-side outputs for people to read and rate: question | reference | base | each adapter."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .errors import DataError

RATINGS = ("funny (1-5)", "appropriate (1-5)")


def read_questions(path: str) -> list[dict]:
    """Jokes as {question, answer} from a CSV/JSON file (answer = reference), or one question per text line."""
    from .tasks.jokes import read_jokes

    if path.lower().endswith((".csv", ".tsv", ".json", ".jsonl")):
        return read_jokes(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); pass a UTF-8 file, one question per line, or a jokes CSV")
    return [{"question": line.strip(), "answer": ""} for line in lines if line.strip()]


def comparison_rows(records: list[dict], outputs: dict[str, list[str]]) -> list[dict]:
    """One row a question: question, reference, then one column per system (base first)."""
    return [{"question": r["question"], "reference": r.get("answer", ""),
             **{system: texts[i] for system, texts in outputs.items()}} for i, r in enumerate(records)]


def markdown_table(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ") or " "

    header = list(rows[0]) if rows else ["question", "reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_rating_sheet(rows: list[dict], systems: list[str], path: Path) -> None:
    """Long format, one line per (question, system), with empty rating columns for people to fill in."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "reference", "system", "output", *RATINGS])
        writer.writeheader()
        for row in rows:
            for system in systems:
                writer.writerow({"question": row["question"], "reference": row["reference"], "system": system,
                                 "output": row[system], **{r: "" for r in RATINGS}})


def summarise_ratings(path: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per system and rating: mean, share of ratings >= 4, and count of filled-in ratings (1 to 5)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the ratings CSV ({e})")
    if rows and "system" not in rows[0]:
        raise DataError(f"{path}: no 'system' column; pass the CSV that compare.py wrote, with ratings filled in")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for i, row in enumerate(rows):
        for rating in RATINGS:
            value = (row.get(rating) or "").strip()
            if not value:
                continue
            try:
                score = float(value)
            except ValueError:
                raise DataError(f"{path}: row {i + 2}, column '{rating}': {value!r} is not a number from 1 to 5")
            if not 1 <= score <= 5:
                raise DataError(f"{path}: row {i + 2}, column '{rating}': {value} is outside 1 to 5")
            summary.setdefault(row["system"], {}).setdefault(rating, []).append(score)
    return rating_summary(summary)


SCALE = (1.0, 5.0)  # the rating scale: no mean can lie outside it, so neither does its interval


def rating_summary(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per system and rating: mean, share of ratings >= 4, count, and a 95% interval for the mean
    (normal approximation, mean +- 1.96 standard errors, clipped to the 1-5 scale; None below 2 ratings)."""
    def stats(values: list[float]) -> dict[str, float]:
        n, mean = len(values), sum(values) / len(values)
        half = 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
        return {"mean": mean, "share_4_or_more": sum(v >= 4 for v in values) / n, "count": n,
                "ci95": None if half is None else [max(SCALE[0], mean - half), min(SCALE[1], mean + half)]}

    return {system: {rating: stats(values) for rating, values in by_rating.items()}
            for system, by_rating in scores.items()}
