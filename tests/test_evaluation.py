"""Issue 4: the official SQuAD v2 numbers, joke metrics, evaluate.py end to end, the comparison table and ratings."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from peft_t5.compare import comparison_rows, markdown_table, summarise_ratings, write_rating_sheet
from peft_t5.errors import DataError
from peft_t5.evaluation import squad_subset
from peft_t5.metrics import squad_v2
from peft_t5.metrics.text import distinct_n, joke_scores, repeats_question, rouge_l

ROOT = Path(__file__).resolve().parent.parent
DATA = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
    {"id": "a", "question": "?", "answers": [{"text": "the Eiffel Tower", "answer_start": 0}], "is_impossible": False},
    {"id": "b", "question": "?", "answers": [{"text": "Paris", "answer_start": 0},
                                             {"text": "Paris, France", "answer_start": 0}], "is_impossible": False},
    {"id": "c", "question": "?", "answers": [], "is_impossible": True},
    {"id": "d", "question": "?", "answers": [], "is_impossible": True},
]}]}]}


def run_squad_cli(tmp_path, preds, *extra):
    (tmp_path / "data.json").write_text(json.dumps(DATA))
    (tmp_path / "pred.json").write_text(json.dumps(preds) if not isinstance(preds, str) else preds)
    return subprocess.run([sys.executable, "-m", "peft_t5.metrics.squad_v2", str(tmp_path / "data.json"),
                           str(tmp_path / "pred.json"), *extra], capture_output=True, text=True)


def test_normalisation_by_hand():
    assert squad_v2.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_v2.normalize_answer("An apple, a pear") == "apple pear"
    assert squad_v2.compute_f1("Paris France", "in Paris") == pytest.approx(0.5)  # 1 shared of 2 and 2 tokens
    assert squad_v2.compute_f1("", "") == 1 and squad_v2.compute_f1("", "Paris") == 0


def test_official_numbers_by_hand(tmp_path):
    # a: "Eiffel Tower." -> exact (article and punctuation go); b: "Paris France" vs golds -> exact via the 2nd gold;
    # c: "" on unanswerable -> right; d: "Paris" on unanswerable -> wrong.
    proc = run_squad_cli(tmp_path, {"a": "Eiffel Tower.", "b": "Paris France", "c": "", "d": "Paris"})
    out = json.loads(proc.stdout)
    assert list(out) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                         "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert (out["exact"], out["f1"], out["total"]) == (75.0, 75.0, 4)
    assert (out["HasAns_exact"], out["NoAns_exact"]) == (100.0, 50.0)
    partial = json.loads(run_squad_cli(tmp_path, {"a": "tower of Eiffel", "b": "x", "c": "", "d": ""}).stdout)
    # a: gold [eiffel, tower] vs [tower, of, eiffel]: p=2/3, r=1 -> F1 0.8; b: 0; c, d: 1
    assert partial["f1"] == pytest.approx(100 * (0.8 + 0 + 1 + 1) / 4)
    assert partial["HasAns_f1"] == pytest.approx(40.0)


def test_threshold_search_on_a_na_prob_file(tmp_path):
    (tmp_path / "na.json").write_text(json.dumps({"a": 0.1, "b": 0.9, "c": 0.8, "d": 0.7}))
    proc = run_squad_cli(tmp_path, {"a": "Eiffel Tower", "b": "wrong", "c": "", "d": "Paris"},
                         "--na-prob-file", str(tmp_path / "na.json"))
    out = json.loads(proc.stdout)
    # Start from 2 (both unanswerable right if everything abstains), walk by na prob: a (+1) = 3 at 0.1,
    # d (-1: answered an unanswerable) = 2, c (0) = 2, b (+0) = 2: best 3/4 at threshold 0.1.
    assert (out["best_exact"], out["best_exact_thresh"]) == (75.0, 0.1)
    assert (out["best_f1"], out["best_f1_thresh"]) == (75.0, 0.1)
    thresholded = json.loads(run_squad_cli(tmp_path, {"a": "Eiffel Tower", "b": "wrong", "c": "", "d": "Paris"},
                                           "-n", str(tmp_path / "na.json"), "-t", "0.5").stdout)
    assert thresholded["exact"] == 75.0  # b, c, d predicted no-answer: b wrong, c and d right


def test_threshold_search_on_a_subset_counts_only_the_predicted_questions(tmp_path):
    # only a and c predicted; d (unanswerable, unpredicted) used to count as a right abstention: best_exact 150
    (tmp_path / "na.json").write_text(json.dumps({"a": 0.2, "c": 0.9}))
    out = json.loads(run_squad_cli(tmp_path, {"a": "Eiffel Tower", "c": "Paris"}, "-n", str(tmp_path / "na.json")).stdout)
    # start at 1 (c right if it abstains), a answered right at 0.2 -> 2 of 2; c answered wrong at 0.9 -> 1
    assert (out["best_exact"], out["best_exact_thresh"]) == (100.0, 0.2)
    assert out["best_f1"] <= 100 and out["total"] == 2


def test_bad_prediction_files_get_one_line(tmp_path):
    assert run_squad_cli(tmp_path, "not json").stderr.startswith("error: ") and "not valid JSON" in run_squad_cli(tmp_path, "{").stderr
    assert "must be a JSON object mapping question id" in run_squad_cli(tmp_path, "[1, 2]").stderr
    proc = run_squad_cli(tmp_path, {"a": "Eiffel Tower", "zzz": "x"})
    assert "warning: 3 questions of" in proc.stderr and "have no prediction" in proc.stderr
    assert "warning: 1 predicted ids are not in" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["total"] == 1 and out["exact"] == 100.0 and "NoAns_total" not in out
    assert "Traceback" not in run_squad_cli(tmp_path, {"zzz": "x"}).stderr


def test_joke_metrics_on_fixed_strings():
    assert rouge_l("it was two tired", "because it was two tired") == pytest.approx(2 * 1 * 0.8 / 1.8)
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert repeats_question("Why did the bike fall over", "Why did the bike fall over?")
    assert not repeats_question("It was two tired.", "Why did the bike fall over?")
    scores = joke_scores(["It was two tired.", "why did the bike fall"], ["It was two tired.", "Because."],
                         ["Why did the bike fall over?"] * 2)
    assert scores["repeats_question"] == 0.5 and scores["mean_length"] == 4.5 and scores["count"] == 2
    assert scores["bleu"] > 0 and 0 < scores["chrf"] < 100


def test_comparison_table_and_rating_summary(tmp_path):
    records = [{"question": "Q1?", "answer": "R1"}, {"question": "Q2?", "answer": "R2"}]
    rows = comparison_rows(records, {"base": ["b1", "b|2"], "jokes": ["j1", "j2"]})
    table = markdown_table(rows).splitlines()
    assert table[0] == "| question | reference | base | jokes |" and len(table) == 4
    assert table[3] == "| Q2? | R2 | b\\|2 | j2 |"
    sheet = tmp_path / "rate.csv"
    write_rating_sheet(rows, ["base", "jokes"], sheet)
    lines = list(csv.DictReader(sheet.open()))
    assert len(lines) == 4 and lines[0]["funny (1-5)"] == "" and {row["system"] for row in lines} == {"base", "jokes"}
    for line, (funny, ok) in zip(lines, [("2", "5"), ("5", "4"), ("1", ""), ("4", "3")]):
        line["funny (1-5)"], line["appropriate (1-5)"] = funny, ok
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    summary = summarise_ratings(str(sheet))
    base, jokes = summary["base"]["funny (1-5)"], summary["jokes"]["funny (1-5)"]
    assert (base["mean"], base["share_4_or_more"], base["count"]) == (1.5, 0.0, 2)
    assert (jokes["mean"], jokes["share_4_or_more"], jokes["count"]) == (4.5, 1.0, 2)
    assert base["ci95"] == pytest.approx([1.0, 1.5 + 0.98])  # 1.96 x sd 0.707 / sqrt(2), clipped to the 1-5 scale
    assert summary["base"]["appropriate (1-5)"]["count"] == 1
    assert summary["base"]["appropriate (1-5)"]["ci95"] is None
    lines[0]["funny (1-5)"] = "great"
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    with pytest.raises(DataError, match=r"row 2, column 'funny \(1-5\)': 'great' is not a number"):
        summarise_ratings(str(sheet))


@pytest.mark.slow
def test_evaluate_script_on_the_bundled_sample(tmp_path):
    from peft_t5.commands.train import train_main as train

    adapter = tmp_path / "squad"
    train(["--task", "squad", "--model", "tiny", "--output_dir", str(adapter), "--max_steps", "10",
           "--max_source_length", "128", "--report_to", "none", "--sample_generations", "0",
           "--generation_eval_samples", "4", "--max_eval_samples", "8", "--disable_tqdm", "true"])
    preds = tmp_path / "out" / "preds.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--task", "squad", "--adapter",
                           str(adapter), "--predictions", str(preds), "--limit", "24", "--batch_size", "8",
                           "--max_source_length", "128", "--compare_base"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = json.loads(preds.read_text())
    assert len(predictions) == 24 and all(isinstance(v, str) for v in predictions.values())
    assert "unanswerable" not in predictions.values()  # the no-answer word is mapped to ""
    metrics = json.loads((preds.parent / "preds.metrics.json").read_text())
    base = json.loads((preds.parent / "preds.base.metrics.json").read_text())
    assert metrics["total"] == base["total"] == 24
    assert metrics["HasAns_total"] + metrics["NoAns_total"] == 24
    articles = json.loads((ROOT / "peft_t5" / "data" / "squad_v2_sample.json").read_text())["data"]
    na_probs = json.loads((preds.parent / "preds.na_prob.json").read_text())
    assert set(na_probs) == set(predictions) and all(0 <= p <= 1 for p in na_probs.values())
    threshold = json.loads((adapter / "peft_t5.json").read_text())["na_threshold"]
    assert threshold == json.loads((adapter / "peft_t5.json").read_text())["metrics"]["eval_best_f1_thresh"]
    official, _ = squad_v2.squad_v2_evaluate(squad_subset(articles, set(predictions)), predictions, na_probs, threshold)
    assert dict(official) == metrics and "best_f1" in metrics  # what the official script prints from the files
    assert f"-t {threshold!r}" in proc.stdout
    assert "adapter (tiny + " in proc.stdout and "base (tiny):" in proc.stdout


def test_applying_the_best_threshold_reproduces_best_f1_on_the_set_it_was_found_on():
    answers = ["Paris", "", "1066", "France", "", "a guess"]
    references = [["Paris"], [], ["1066"], [], ["Normans"], []]
    na_probs = [0.1, 0.9, 0.3, 0.6, 0.8, 0.7]
    scores = squad_v2.squad_v2_scores(answers, references, na_probs)
    assert scores["f1"] == pytest.approx(100 * 3 / 6)  # Paris, 1066, the empty no-answer
    thresh = scores["best_f1_thresh"]
    applied = ["" if p > thresh else a for a, p in zip(answers, na_probs)]
    assert squad_v2.squad_v2_scores(applied, references)["f1"] == pytest.approx(scores["best_f1"])
    assert scores["best_f1"] == pytest.approx(100 * 5 / 6) and thresh == 0.3


def toy_squad(path):
    """Answerable questions ("alpha") and unanswerable ones with very different contexts: learnable in seconds."""
    articles = []
    for a in range(6):
        paragraphs = []
        for p in range(4):
            paragraphs.append({"context": f"alpha beta gamma delta {a} {p}.", "qas": [
                {"id": f"{a}-{p}-a{i}", "question": f"What is the first word {i}?", "is_impossible": False,
                 "answers": [{"text": "alpha", "answer_start": 0}]} for i in range(2)]})
            paragraphs.append({"context": f"zzz qqq xxx www {a} {p}.", "qas": [
                {"id": f"{a}-{p}-n{i}", "question": f"Why zzz qqq xxx {i}?", "is_impossible": True, "answers": []}
                for i in range(2)]})
        articles.append({"title": f"T{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return str(path)


@pytest.mark.slow
def test_no_answer_probability_is_higher_where_the_trained_model_abstains(tmp_path):
    from peft_t5.cli import command
    from peft_t5.commands.train import train_main as train

    data, adapter, preds = toy_squad(tmp_path / "toy.json"), tmp_path / "adapter", tmp_path / "out" / "preds.json"
    train(["--task", "squad", "--model", "tiny", "--data", data, "--output_dir", str(adapter), "--max_steps", "250",
           "--learning_rate", "0.005", "--target_modules", "all-linear", "--lora_r", "32", "--lora_dropout", "0",
           "--max_source_length", "32", "--max_target_length", "8", "--per_device_train_batch_size", "16",
           "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
           "--eval_on_start", "false", "--generation_eval_samples", "8", "--max_eval_samples", "8",
           "--sample_generations", "0", "--report_to", "none", "--disable_tqdm", "true"])
    command("evaluate")(["--task", "squad", "--adapter", str(adapter), "--data", data, "--predictions", str(preds),
                         "--max_source_length", "32", "--max_new_tokens", "8", "--na_threshold", "1.0"])
    answers, na_probs = json.loads(preds.read_text()), json.loads((preds.parent / "preds.na_prob.json").read_text())
    abstained = [na_probs[q] for q, a in answers.items() if a == ""]
    answered = [na_probs[q] for q, a in answers.items() if a != ""]
    assert abstained and answered, answers  # the model learned to do both
    assert min(abstained) > 0.5 > max(answered)
