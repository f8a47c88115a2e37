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


def squad_v2_scores(predictions: list[str], references: list[list[str]],
                    na_probs: list[float] | None = None) -> dict[str, float]:
    """exact, f1 (0-100) and their HasAns/NoAns halves for parallel lists of answers and gold texts; with
    no-answer probabilities, also the official best_exact/best_f1 and the thresholds that reach them."""
    exact = [max(compute_exact(g, p) for g in gold_answers(r)) for p, r in zip(predictions, references)]
    f1 = [max(compute_f1(g, p) for g in gold_answers(r)) for p, r in zip(predictions, references)]
    has_ans = [bool(r) for r in references]
    out = {"exact": 100.0 * sum(exact) / max(len(exact), 1), "f1": 100.0 * sum(f1) / max(len(f1), 1)}
    if na_probs is not None and predictions:
        ids = range(len(predictions))
        preds, probs, has = dict(zip(ids, predictions)), dict(zip(ids, na_probs)), dict(zip(ids, has_ans))
        find_all_best_thresh(out, preds, dict(zip(ids, exact)), dict(zip(ids, f1)), probs, has)
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has_ans) if h == keep]
        if idx:
            out[f"{prefix}_exact"] = 100.0 * sum(exact[i] for i in idx) / len(idx)
            out[f"{prefix}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
    return out


# --- The official evaluation over a SQuAD v2.0 data file and a {question_id: answer} predictions file ---

def make_qid_to_has_ans(dataset: list[dict]) -> dict[str, bool]:
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    return qid_to_has_ans


def get_raw_scores(dataset: list[dict], preds: dict[str, str]) -> tuple[dict, dict, list[str]]:
    """Exact and F1 per question id, and the ids with no prediction (the official script prints and skips them)."""
    exact_scores, f1_scores, missing = {}, {}, []
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                golds = gold_answers([a["text"] for a in qa["answers"]])
                if qid not in preds:
                    missing.append(qid)
                    continue
                a_pred = preds[qid]
                exact_scores[qid] = max(compute_exact(a, a_pred) for a in golds)
                f1_scores[qid] = max(compute_f1(a, a_pred) for a in golds)
    return exact_scores, f1_scores, missing


def apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict([
            ("exact", 100.0 * sum(exact_scores.values()) / total),
            ("f1", 100.0 * sum(f1_scores.values()) / total),
            ("total", total),
        ])
    total = len(qid_list)
    return collections.OrderedDict([
        ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
        ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
        ("total", total),
    ])


def merge_eval(main_eval, new_eval, prefix):
    for k in new_eval:
        main_eval["%s_%s" % (prefix, k)] = new_eval[k]


def find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    # the official script counts every no-answer question of the data; counting only the scored ones is the
    # same where every question has a prediction, and stays within 100 where only some have
    num_no_ans = sum(1 for k in scores if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            if preds[qid]:
                diff = -1
            else:
                diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def find_all_best_thresh(main_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans):
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    main_eval["best_exact"] = best_exact
    main_eval["best_exact_thresh"] = exact_thresh
    main_eval["best_f1"] = best_f1
    main_eval["best_f1_thresh"] = f1_thresh


def squad_v2_evaluate(dataset: list[dict], preds: dict[str, str], na_probs: dict[str, float] | None = None,
                      na_prob_thresh: float = 1.0) -> tuple[collections.OrderedDict, list[str]]:
    """The official script's main(): its metric dict, and the ids that had no prediction.

    Where predictions are missing, the official script crashes computing HasAns/NoAns; here those
    halves count only the predicted questions, and the missing ids are returned for reporting.
    """
    has_na_file = na_probs is not None
    if na_probs is None:
        na_probs = {k: 0.0 for k in preds}
    qid_to_has_ans = make_qid_to_has_ans(dataset)
    exact_raw, f1_raw, missing = get_raw_scores(dataset, preds)
    if not exact_raw:
        raise ValueError("no prediction matches a question of the data file")
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v and k in exact_raw]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v and k in exact_raw]
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        merge_eval(out_eval, make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids), "HasAns")
    if no_ans_qids:
        merge_eval(out_eval, make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids), "NoAns")
    if has_na_file:
        find_all_best_thresh(out_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans)
    return out_eval, missing


def _load_json(path: str, what: str):
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such {what} file")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: the {what} file is not valid JSON ({e})")


def main(argv: list[str] | None = None) -> int:
    """python -m peft_t5.metrics.squad_v2 data.json pred.json [-n na_prob.json] [-o eval.json] [-t 1.0]"""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser("SQuAD v2.0 evaluation, identical in its numbers to the official script.")
    parser.add_argument("data_file", metavar="data.json", help="Input data JSON file.")
    parser.add_argument("pred_file", metavar="pred.json", help="Model predictions.")
    parser.add_argument("--out-file", "-o", metavar="eval.json", help="Write accuracy metrics to file (default is stdout).")
    parser.add_argument("--na-prob-file", "-n", metavar="na_prob.json", help="Model estimates of probability of no answer.")
    parser.add_argument("--na-prob-thresh", "-t", type=float, default=1.0,
                        help='Predict "" if no-answer probability exceeds this (default = 1.0).')
    opts = parser.parse_args(argv)
    data = _load_json(opts.data_file, "data")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SystemExit(f"error: {opts.data_file}: not the SQuAD v2.0 layout (a 'data' list of articles)")
    preds = _load_json(opts.pred_file, "predictions")
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise SystemExit(f"error: {opts.pred_file}: predictions must be a JSON object mapping question id to answer text")
    na_probs = _load_json(opts.na_prob_file, "no-answer probability") if opts.na_prob_file else None
    if na_probs is not None and (not isinstance(na_probs, dict) or set(preds) - set(na_probs)):
        raise SystemExit(f"error: {opts.na_prob_file}: needs a probability for every predicted question id")
    try:
        out_eval, missing = squad_v2_evaluate(data["data"], preds, na_probs, opts.na_prob_thresh)
    except (KeyError, TypeError) as e:
        raise SystemExit(f"error: {opts.data_file}: not the SQuAD v2.0 layout (missing {e})")
    except ValueError as e:
        raise SystemExit(f"error: {opts.pred_file}: {e}")
    unknown = set(preds) - set(make_qid_to_has_ans(data["data"]))
    if missing:
        print(f"warning: {len(missing)} questions of {opts.data_file} have no prediction (first: {missing[0]}); "
              "they are left out of every score", file=sys.stderr)
    if unknown:
        print(f"warning: {len(unknown)} predicted ids are not in {opts.data_file} (e.g. {sorted(unknown)[0]}); "
              "ignored", file=sys.stderr)
    if opts.out_file:
        with open(opts.out_file, "w") as f:
            json.dump(out_eval, f)
    else:
        print(json.dumps(out_eval, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
