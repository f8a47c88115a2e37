"""SQuAD v2.0 exact match and F1, computed exactly as the official evaluation script does.

The functions below keep the official script's logic line for line (normalisation, max over gold
answers, "" as the gold of an unanswerable question, the no-answer threshold search), so that the
numbers agree with it to the last digit. No torch here.
"""
from __future__ import annotations

import collections
import re
import string


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def gold_answers(answer_texts: list[str]) -> list[str]:
    """The official rule: answers that normalise to nothing are dropped; none left means gold is ""."""
    golds = [a for a in answer_texts if normalize_answer(a)]
    return golds or [""]


def squad_v2_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """exact, f1 (0-100) and their HasAns/NoAns halves for parallel lists of answers and gold texts."""
    exact = [max(compute_exact(g, p) for g in gold_answers(r)) for p, r in zip(predictions, references)]
    f1 = [max(compute_f1(g, p) for g in gold_answers(r)) for p, r in zip(predictions, references)]
    has_ans = [bool(r) for r in references]
    out = {"exact": 100.0 * sum(exact) / max(len(exact), 1), "f1": 100.0 * sum(f1) / max(len(f1), 1)}
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has_ans) if h == keep]
        if idx:
            out[f"{prefix}_exact"] = 100.0 * sum(exact[i] for i in idx) / len(idx)
            out[f"{prefix}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
    return out
