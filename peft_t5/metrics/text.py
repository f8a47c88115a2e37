"""Scores for generated text against references. No torch here."""
from __future__ import annotations


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
