"""Rebuild the bundled samples in peft_t5/data/ from the real data in ../shared/data (run once, by hand).

squad_v2_sample.json: 300 SQuAD v2.0 questions (150 answerable, 150 not) with their contexts, from 8 articles.
jokes_sample.csv: 500 question-answer jokes with crude or offensive ones left out by a word list.
"""
import csv
import json
import random
import sys
from pathlib import Path

from peft_t5.tasks.jokes import OFFENSIVE

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
OUT = ROOT / "peft_t5" / "data"


# Openings that mostly introduce puns, which are the cleanest part of the set.
PUN_OPENINGS = ("what do you call", "why did the", "what did the", "why do", "how do you", "where do", "what kind of")


def squad_sample(n_per_kind=150, n_articles=8, per_paragraph=2):
    data = json.loads((SHARED / "squad" / "squad-v2-dev-cs224n.json").read_text())
    counts = {True: 0, False: 0}
    articles = []
    for article in data["data"][:n_articles]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = []
            for impossible in (False, True):
                picked = [q for q in p["qas"] if q["is_impossible"] == impossible][:per_paragraph]
                picked = picked[: max(0, n_per_kind // n_articles + 1 - 0)]
                for q in picked:
                    if counts[impossible] < n_per_kind:
                        qas.append(q)
                        counts[impossible] += 1
            if qas:
                paragraphs.append({"context": p["context"], "qas": qas})
            if sum(counts.values()) >= (len(articles) + 1) * 2 * n_per_kind // n_articles:
                break
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}, counts


def jokes_sample(n=500, seed=0):
    rows = list(csv.DictReader(open(SHARED / "jokes" / "qa-jokes.csv", encoding="utf-8")))
    clean = [r for r in rows
             if r["Question"].strip().endswith("?") and r["Question"].lower().startswith(PUN_OPENINGS) and 2 <= len(r["Answer"].split()) <= 10
             and len(r["Question"].split()) <= 25 and not OFFENSIVE.search(r["Question"] + " " + r["Answer"])
             and r["Answer"].isascii() and r["Question"].isascii()]
    random.Random(seed).shuffle(clean)
    return clean[:n], len(clean)


if __name__ == "__main__":
    squad, counts = squad_sample()
    (OUT / "squad_v2_sample.json").write_text(json.dumps(squad, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    jokes, n_clean = jokes_sample()
    with open(OUT / "jokes_sample.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Question", "Answer"])
        w.writeheader()
        w.writerows({"Question": j["Question"].strip(), "Answer": j["Answer"].strip()} for j in jokes)
    print(f"squad: {counts[False]} answerable + {counts[True]} unanswerable; jokes: {len(jokes)} of {n_clean} clean")
