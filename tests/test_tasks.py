"""Task readers, prompts, splits and scores: no torch, no model."""
import json

import pytest

from peft_t5.errors import DataError, PeftT5Error
from peft_t5.metrics.squad_v2 import squad_v2_scores
from peft_t5.tasks import get_task, jokes, squad


def squad_file(tmp_path, articles):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return str(path)


def article(title, n_questions):
    qas = [{"id": f"{title}-{i}", "question": f"Question {i}?", "is_impossible": i % 2 == 1,
            "answers": [] if i % 2 else [{"text": "alpha", "answer_start": 4}]} for i in range(n_questions)]
    return {"title": title, "paragraphs": [{"context": "The alpha beta.", "qas": qas}]}


def test_squad_source_and_targets(squad_record):
    task = get_task("squad")
    assert task.source(squad_record) == f"question: {squad_record['question']} context: {squad_record['context']}"
    assert task.target(squad_record) == "France"
    unanswerable = dict(squad_record, answers=[], answer_starts=[])
    assert task.target(unanswerable) == squad.NO_ANSWER
    assert task.answer_from_output(" Unanswerable ") == ""
    assert task.answer_from_output("France") == "France"


def test_squad_reader_keeps_unanswerable_and_splits_by_article(tmp_path):
    path = squad_file(tmp_path, [article(f"A{i}", 4) for i in range(10)])
    records = squad.read_squad_v2(path)
    assert len(records) == 40
    assert sum(not r["answers"] for r in records) == 20  # unanswerable questions are kept, not skipped
    splits = squad.load_splits(path, seed=1, validation_fraction=0.2)
    assert len(splits["validation"]) == 8 and len(splits["train"]) == 32
    assert not {r["title"] for r in splits["train"]} & {r["title"] for r in splits["validation"]}
    assert squad.load_splits(path, seed=1, validation_fraction=0.2) == splits


def test_squad_bundled_sample_is_half_unanswerable():
    records = squad.read_squad_v2(squad.SAMPLE)
    assert len(records) == 300
    assert sum(not r["answers"] for r in records) == 150


def test_squad_wrong_layout_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"articles": []}))
    with pytest.raises(DataError, match="bad.json: not the SQuAD v2.0 layout"):
        squad.read_squad_v2(str(path))


def test_jokes_reader_accepts_any_case_and_reddit_fields(tmp_path):
    csv_path = tmp_path / "j.csv"
    csv_path.write_text("QUESTION,answer\nWhy did the bike fall over?,It was two tired.\n")
    assert jokes.read_jokes(str(csv_path)) == [{"question": "Why did the bike fall over?", "answer": "It was two tired."}]
    jsonl = tmp_path / "dump.jsonl"
    jsonl.write_text('{"title": "What is a sad hat?", "body": "A sombrero.", "score": 3}\n')
    assert jokes.read_jokes(str(jsonl)) == [{"question": "What is a sad hat?", "answer": "A sombrero."}]
    bad = tmp_path / "bad.csv"
    bad.write_text("setup,punch\na,b\n")
    with pytest.raises(DataError, match="bad.csv: record 0 has columns"):
        jokes.read_jokes(str(bad))


def test_jokes_filter_keeps_short_question_answer_jokes():
    assert jokes.is_qa_joke({"question": "Why?", "answer": "Because."})
    assert not jokes.is_qa_joke({"question": "A man walks into a bar.", "answer": "Ouch."})
    assert not jokes.is_qa_joke({"question": "Why?", "answer": ""})
    long_answer = {"question": "Why?", "answer": "word " * 30}
    assert not jokes.is_qa_joke(long_answer)
    assert jokes.is_qa_joke(long_answer, max_answer_words=40)


def test_jokes_split_is_deterministic_and_disjoint():
    a = jokes.load_splits(jokes.SAMPLE, seed=7)
    b = jokes.load_splits(jokes.SAMPLE, seed=7)
    c = jokes.load_splits(jokes.SAMPLE, seed=8)
    assert a == b and a["train"] != c["train"]
    assert [len(a[s]) for s in ("train", "validation", "test")] == [450, 25, 25]
    seen = [r["question"] + r["answer"] for s in a.values() for r in s]
    assert len(seen) == len(set(seen)) == 500


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(PeftT5Error, match="unknown task 'poems'; known tasks: jokes, squad"):
        get_task("poems")


def test_squad_v2_scores_by_hand():
    # "The France" normalises to "france" (article dropped): exact; "in France today" vs "France": F1 = 2*(1/3*1)/(1/3+1) = 0.5
    scores = squad_v2_scores(["The France", "in France today", "", "Paris"], [["France"], ["France"], [], []])
    assert scores["exact"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)
    assert scores["HasAns_f1"] == pytest.approx(75.0) and scores["NoAns_exact"] == pytest.approx(50.0)


JOKE_ROWS = [("Why did the café close?", "It ran out of crème brûlée."), ("What is a; b?", 'A "joke", of sorts.')]


def write_table(path, rows, delimiter=",", encoding="utf-8", newline="\n", bom=False):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    writer.writerow(["Question", "Answer"])
    writer.writerows(rows)
    path.write_bytes(("\ufeff" if bom else "").encode("utf-8") + buffer.getvalue().encode(encoding))
    return str(path)


@pytest.mark.parametrize("name, options", [
    ("excel-utf8.csv", dict(bom=True, newline="\r\n")),  # Excel "CSV UTF-8"
    ("excel-windows.csv", dict(encoding="cp1252", newline="\r\n")),  # Excel "CSV" on Western Windows
    ("excel-europe.csv", dict(delimiter=";", bom=True)),  # where the decimal mark is a comma
    ("sheet.tsv", dict(delimiter="\t")),
    ("excel-unicode.txt", dict(delimiter="\t", encoding="utf-16")),  # Excel "Unicode text" (BOM + UTF-16)
    ("mac-classic.csv", dict(newline="\r")),
])
def test_jokes_files_as_spreadsheets_and_editors_save_them_read_the_same(tmp_path, name, options, caplog):
    from peft_t5.tasks.jokes import read_jokes

    path = write_table(tmp_path / name, JOKE_ROWS, **options)
    assert [(r["question"], r["answer"]) for r in read_jokes(path)] == JOKE_ROWS
    assert ("read as Windows-1252" in caplog.text) == (options.get("encoding") == "cp1252")


def test_squad_json_with_a_byte_order_mark_reads(tmp_path):
    from peft_t5.tasks.squad import SAMPLE, read_squad_v2

    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + open(SAMPLE, "rb").read())
    assert read_squad_v2(str(path)) == read_squad_v2(SAMPLE)


def test_one_squad_article_is_split_by_paragraph_and_one_paragraph_by_question(tmp_path, caplog):
    one = article("Only", 4)
    one["paragraphs"] = [dict(one["paragraphs"][0], context=f"The alpha beta {i}.",
                              qas=[dict(q, id=f"{i}-{q['id']}") for q in one["paragraphs"][0]["qas"]]) for i in range(10)]
    splits = squad.load_splits(squad_file(tmp_path, [one]), seed=1, validation_fraction=0.2)
    assert len(splits["validation"]) == 8 and len(splits["train"]) == 32
    assert not {r["context"] for r in splits["train"]} & {r["context"] for r in splits["validation"]}
    assert "only one article in the data, so whole paragraphs are held out" in caplog.text
    caplog.clear()
    splits = squad.load_splits(squad_file(tmp_path, [article("One", 20)]), seed=1, validation_fraction=0.2)
    assert (len(splits["train"]), len(splits["validation"])) == (16, 4)
    assert "only one paragraph in the data, so whole questions are held out" in caplog.text


def test_jokes_splits_account_for_every_record(tmp_path):
    from types import SimpleNamespace

    from peft_t5.training import record_fates

    rows = [(f"Why {i}?", f"Because {i}.") for i in range(40)] + [("No question mark", "x"), ("Empty?", "")]
    path = write_table(tmp_path / "j.csv", rows)
    splits = jokes.load_splits(path, seed=1, validation_fraction=0.1, test_fraction=0.1)
    line = record_fates(splits, SimpleNamespace(max_train_samples=None, max_eval_samples=2))
    assert line == ("42 records: 32 training, 4 validation (2 used), 4 test, 2 skipped: 1 empty question or answer, "
                    "1 not question-answer jokes (no '?', or over 40/25 words)")
