"""Scores for generated text against references. No torch here."""
from __future__ import annotations

import re


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (the rouge-score package's default, without stemming)."""
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-L (best over references) and sacreBLEU chrF, both 0-100."""
    import sacrebleu

    rouge = [max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references)]
    by_position = [list(col) for col in zip(*references)]  # sacrebleu wants one list per reference slot
    chrf = sacrebleu.corpus_chrf(predictions, by_position).score if predictions else 0.0
    return {"rougeL": 100.0 * sum(rouge) / max(len(rouge), 1), "chrf": chrf}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def distinct_n(predictions: list[str], n: int) -> float:
    """Distinct n-grams over all outputs divided by all n-grams (Li et al., 2016): 1.0 means no repetition."""
    grams = [tuple(w[i:i + n]) for p in predictions for w in [p.lower().split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats_question(prediction: str, question: str) -> bool:
    """The base model's typical failure: an output that is (nearly) the question again."""
    out, q = _words(prediction), set(_words(question))
    if not out:
        return False
    return out == _words(question) or (len(out) >= 3 and sum(w in q for w in out) / len(out) >= 0.8)


def joke_scores(predictions: list[str], references: list[str], questions: list[str]) -> dict[str, float]:
    """sacreBLEU BLEU and chrF, ROUGE-L, distinct-1/2, mean length in words, share repeating the question."""
    import sacrebleu

    n = max(len(predictions), 1)
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score if predictions else 0.0,
        "rougeL": 100.0 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "distinct_1": distinct_n(predictions, 1),
        "distinct_2": distinct_n(predictions, 2),
        "mean_length": sum(len(p.split()) for p in predictions) / n,
        "repeats_question": sum(repeats_question(p, q) for p, q in zip(predictions, questions)) / n,
        "count": len(predictions),
    }
