"""Generate a task's answers for held-out records and score them: SQuAD v2 officially, jokes by text metrics."""
from __future__ import annotations

from .generation import generate_texts, no_answer_probs
from .metrics.squad_v2 import squad_v2_evaluate
from .metrics.text import joke_scores
from .tasks import Task


def predict(model, tokenizer, task: Task, records: list[dict], batch_size: int = 16, num_beams: int = 1,
            max_source_length: int = 512, max_new_tokens: int = 64) -> tuple[list[str], list[float] | None]:
    """The task's answers (squad: no-answer -> ""), generated in length-sorted batches with a progress bar, and
    for a task with a no-answer target, each record's no-answer probability (else None)."""
    sources = [task.source(r) for r in records]
    outputs = generate_texts(model, tokenizer, sources, batch_size=batch_size, max_source_length=max_source_length,
                             max_new_tokens=max_new_tokens, num_beams=num_beams, progress=True)
    na = (no_answer_probs(model, tokenizer, sources, outputs, task.no_answer, batch_size, max_source_length,
                          max_new_tokens) if task.no_answer else None)
    return [task.answer_from_output(o) for o in outputs], na


def squad_subset(articles: list[dict], ids: set[str]) -> list[dict]:
    """The SQuAD articles keeping only the questions in `ids`, so that --limit scores only what was predicted."""
    out = []
    for article in articles:
        paragraphs = [dict(p, qas=[qa for qa in p["qas"] if qa["id"] in ids]) for p in article["paragraphs"]]
        paragraphs = [p for p in paragraphs if p["qas"]]
        if paragraphs:
            out.append(dict(article, paragraphs=paragraphs))
    return out


def score(task: Task, records: list[dict], answers: list[str], articles: list[dict] | None = None,
          na_probs: list[float] | None = None, na_threshold: float = 1.0) -> dict:
    """squad: the official metrics over the predicted questions (with na_probs: best_exact/best_f1, and exact/f1
    with answers over na_threshold dropped, as the official script's -t); jokes: text metrics."""
    if task.name == "squad":
        preds = {r["id"]: a for r, a in zip(records, answers)}
        probs = None if na_probs is None else {r["id"]: p for r, p in zip(records, na_probs)}
        metrics, _ = squad_v2_evaluate(squad_subset(articles, set(preds)), preds, probs, na_threshold)
        return dict(metrics)
    return joke_scores(answers, [task.references(r)[0] for r in records], [r["question"] for r in records])
