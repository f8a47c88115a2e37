"""Blind ratings in SQLite: which outputs each rater was shown (in which order), and the scores they gave.

SQLite, because concurrent raters need transactions and a crash must lose nothing committed; one connection
per call keeps it safe from the server's threads.
"""
from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ..compare import rating_summary
from ..errors import PeftT5Error
from ..tasks import template_fields

BASE = "base"  # the model with adapters disabled (bank.BASE; not imported, so that this module needs no torch)

RATINGS = ("funny", "appropriate")
SCHEMA = """
CREATE TABLE IF NOT EXISTS outputs (question_id INTEGER, system TEXT, output TEXT, PRIMARY KEY (question_id, system));
CREATE TABLE IF NOT EXISTS shown (id TEXT PRIMARY KEY, question_id INTEGER, question TEXT, systems TEXT, rater TEXT,
                                  created REAL);
CREATE TABLE IF NOT EXISTS ratings (shown_id TEXT, slot INTEGER, system TEXT, question TEXT, output TEXT,
                                    funny INTEGER, appropriate INTEGER, rater TEXT, created REAL,
                                    PRIMARY KEY (shown_id, slot));
"""


def rating_plan(metadata: dict[str, dict], requested: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(systems to rate, the adapter whose prompt the base gets, adapters left out) for blind rating.

    A rater sees a question alone, so only adapters whose prompt a question fills can be rated: by default the
    others are left out (and said so); asked for by name, they are refused. metadata: adapter name -> peft_t5.json.
    """
    def needs(name: str) -> list[str]:
        return [f for f in template_fields(metadata[name].get("template", "{question}")) if f != "question"]

    refused = [name for name in requested if name != BASE and needs(name)]
    if refused:
        name = refused[0]
        raise PeftT5Error(f"--rate_systems: {name} cannot be rated blind: its prompt needs {', '.join(needs(name))} "
                          "besides the question, and raters see only questions; leave it out of --rate_systems")
    systems = requested or [BASE, *(name for name in metadata if not needs(name))]
    left_out = [] if requested else [name for name in metadata if needs(name)]
    prompt_of = next((s for s in systems if s != BASE), None) or next((n for n in metadata if not needs(n)), None)
    if BASE in systems and prompt_of is None:
        raise PeftT5Error("blind rating of base needs an adapter whose prompt takes a question alone (jokes), to "
                          "prompt the base with; load one, or rate without base")
    return systems, prompt_of, left_out


class RatingStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with closing(self._connect()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise PeftT5Error(f"{self.path}: not a ratings database ({e}); pass a new file name or the one the "
                              "server wrote")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def is_database(path: str | Path) -> bool:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"

    def cached_outputs(self, question_id: int) -> dict[str, str]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT system, output FROM outputs WHERE question_id = ?", (question_id,))
            return dict(rows.fetchall())

    def cache_outputs(self, question_id: int, outputs: dict[str, str]) -> None:
        """Keep the first outputs generated for a question, so every rater (and a restarted server) sees them."""
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR IGNORE INTO outputs VALUES (?, ?, ?)",
                           [(question_id, system, text) for system, text in outputs.items()])

    def next_question(self, rater: str, count: int) -> int | None:
        """The question this rater has not rated that has the fewest ratings so far (ties at random)."""
        with closing(self._connect()) as db:
            rated = {q for (q,) in db.execute("SELECT DISTINCT s.question_id FROM ratings r JOIN shown s "
                                              "ON r.shown_id = s.id WHERE r.rater = ?", (rater,))}
            counts = dict(db.execute("SELECT s.question_id, COUNT(*) FROM ratings r JOIN shown s ON r.shown_id = s.id "
                                     "GROUP BY s.question_id").fetchall())
        left = [q for q in range(count) if q not in rated]
        if not left:
            return None
        fewest = min(counts.get(q, 0) for q in left)
        return random.choice([q for q in left if counts.get(q, 0) == fewest])

    def show(self, question_id: int, question: str, outputs: dict[str, str], rater: str) -> dict:
        """Record a blind presentation: the outputs in shuffled order, without their systems."""
        systems = list(outputs)
        random.shuffle(systems)
        shown_id = secrets.token_urlsafe(12)
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO shown VALUES (?, ?, ?, ?, ?, ?)",
                       (shown_id, question_id, question, json.dumps(systems), rater, time.time()))
        return {"id": shown_id, "question": question, "outputs": [outputs[s] for s in systems]}

    def rate(self, shown_id: str, scores: list[dict], rater: str) -> int:
        """Store one rating per shown output ({"funny": 1-5, "appropriate": 1-5}); a second rating by the same rater
        replaces the first. KeyError: never shown; PermissionError: shown to another rater."""
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT question_id, question, systems, rater FROM shown WHERE id = ?",
                             (shown_id,)).fetchone()
            if row is None:
                raise KeyError(shown_id)
            question_id, question, systems = row[0], row[1], json.loads(row[2])
            if row[3] != rater:
                raise PermissionError(shown_id)
            if len(scores) != len(systems):
                raise ValueError(f"ratings: {len(scores)} given for {len(systems)} outputs; rate each output once")
            outputs = self.cached_outputs(question_id)
            db.executemany("INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(shown_id, slot, system, question, outputs.get(system, ""), score["funny"],
                             score["appropriate"], rater, time.time())
                            for slot, (system, score) in enumerate(zip(systems, scores))])
        return len(scores)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per system and rating: mean, share >= 4, count and a 95% interval (as compare.py --ratings on a CSV)."""
        scores: dict[str, dict[str, list[float]]] = {}
        with closing(self._connect()) as db:
            for system, *values in db.execute("SELECT system, funny, appropriate FROM ratings"):
                for rating, value in zip(RATINGS, values):
                    scores.setdefault(system, {}).setdefault(rating, []).append(float(value))
        return rating_summary(scores)
