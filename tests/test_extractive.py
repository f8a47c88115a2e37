"""Extractive SQuAD v2 (--task squad_extractive): windows over long contexts whose answer positions map back to the
gold text, unanswerables at the no-answer position, the span post-processing against hand-made logits, and a
trained adapter that is a plain PEFT QUESTION_ANS folder whose every answer is a span of its context or empty."""
import json
import subprocess
import sys

import numpy as np
import pytest

from peft_t5.extractive import NO_ANSWER_POSITION, SpanAnswer, Windows, best_spans, extractive_scores, windows
from peft_t5.metrics.squad_v2 import normalize_answer
from peft_t5.tasks.squad import SAMPLE, read_squad_v2

QUICK = dict(model="tiny", max_steps=3, report_to="none", sample_generations=3, max_source_length=96, doc_stride=32,
             max_train_samples=40, max_eval_samples=12, generation_eval_samples=12, disable_tqdm=True)


@pytest.fixture(scope="module")
def records():
    return read_squad_v2(SAMPLE)


def test_answer_positions_map_back_to_the_gold_text_in_every_window_that_holds_it(records, tokenizer):
    wins = windows(records, tokenizer, max_length=96, doc_stride=32)
    held, later_windows = set(), 0
    for row, index in enumerate(wins.record):
        start, end, offsets = wins.start_positions[row], wins.end_positions[row], wins.offsets[row]
        if start == NO_ANSWER_POSITION:
            continue
        record = records[index]
        span = record["context"][offsets[start][0]:offsets[end][1]]
        assert normalize_answer(span) == normalize_answer(record["answers"][0]), (record["id"], span)
        held.add(index)
        later_windows += row > wins.record.index(index)  # found past the first window of its context
    answerable = [i for i, r in enumerate(records) if r["answers"]]
    assert len(wins.input_ids) > len(records) and later_windows > 10  # long contexts were split, answers found across
    assert len(held) >= 0.95 * len(answerable)  # the rest: answers longer than a window's context part
    assert all(len(ids) <= 96 for ids in wins.input_ids)


def test_unanswerables_and_windows_without_the_answer_point_at_the_marker(records, tokenizer):
    wins = windows(records, tokenizer, max_length=96, doc_stride=32)
    marker = tokenizer("question:", add_special_tokens=False).input_ids[0]
    assert all(ids[NO_ANSWER_POSITION] == marker for ids in wins.input_ids)
    assert all(offsets[NO_ANSWER_POSITION] is None for offsets in wins.offsets)  # never part of an answer
    unanswerable = [row for row, i in enumerate(wins.record) if not records[i]["answers"]]
    assert unanswerable and all(wins.start_positions[r] == wins.end_positions[r] == NO_ANSWER_POSITION
                                for r in unanswerable)


def hand_made(context: str, spans: list[tuple[int, int]]) -> tuple[list[dict], Windows]:
    """One record, one window: position 0 the marker, then one token per given character span of the context."""
    record = {"id": "x", "question": "q", "context": context, "answers": ["b c"], "answer_starts": [2]}
    return [record], Windows(input_ids=[[0] * (len(spans) + 1)], record=[0], offsets=[[None, *spans]],
                             start_positions=[0], end_positions=[0])


def test_the_best_valid_span_is_chosen_within_max_answer_length_and_the_threshold():
    context = "a b c d e"
    records, wins = hand_made(context, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)])
    start = np.array([[0.0, 1.0, 6.0, 0.0, 0.0, 9.0]])  # the best start is the last token...
    end = np.array([[0.0, 7.0, 0.0, 4.0, 0.0, -2.0]])  # ...and the best end the first: invalid together
    [answer] = best_spans(records, wins, start, end)
    assert answer.text == "b c" and answer.null_margin == pytest.approx(0.0 - (6.0 + 4.0))  # tokens 2-3
    [short] = best_spans(records, wins, start, end, max_answer_length=1)
    assert short.text == "a"  # 1.0 + 7.0, the best one-token span
    null_start = start.copy()
    null_start[0, 0] = 13.0  # the null score 13.0 beats the best span's 10.0 by 3.0
    [nothing] = best_spans(records, wins, null_start, end)
    assert nothing.text == "b c" and nothing.null_margin == pytest.approx(3.0)
    assert nothing.answer(threshold=0.0) == "" and nothing.answer(threshold=3.5) == "b c"
    assert SpanAnswer("", float("inf")).answer(1e9) == ""


def test_a_question_takes_the_best_span_of_its_windows_and_the_lowest_null_score():
    context = "a b c d"
    record = {"id": "x", "question": "q", "context": context, "answers": ["d"], "answer_starts": [6]}
    wins = Windows(input_ids=[[0] * 3, [0] * 3], record=[0, 0], offsets=[[None, (0, 1), (2, 3)],
                                                                         [None, (4, 5), (6, 7)]])
    start = [np.array([4.0, 1.0, 0.0]), np.array([2.0, 0.0, 3.0])]
    end = [np.array([4.0, 0.0, 1.0]), np.array([2.0, 0.0, 3.0])]
    [answer] = best_spans([record], wins, start, end)
    assert answer.text == "d" and answer.null_margin == pytest.approx(4.0 - 6.0)  # null: min(8, 4)
    scores = extractive_scores([record], [answer])
    assert scores["exact"] == 100.0 and scores["HasAns_f1"] == 100.0 and "best_f1_thresh" in scores


@pytest.mark.slow
def test_extractive_refusals_come_before_the_heavy_imports(tmp_path):
    cases = [(["--method", "prompt_tuning"], "--method prompt_tuning with --task squad_extractive: its virtual "
                                            "tokens shift every position"),
             (["--streaming"], "--streaming with --task squad_extractive: not supported"),
             (["--doc_stride", "300", "--max_source_length", "512"], "--doc_stride 300: the windows of a context "
                                                                     "overlap by it")]
    code = ("import sys; from peft_t5.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('torch' in sys.modules, rc)")
    for flags, said in cases:
        out = subprocess.run([sys.executable, "-c", code, "train", "--task", "squad_extractive", "--model", "tiny",
                              "--output_dir", str(tmp_path / "x"), *flags], capture_output=True, text=True)
        assert out.stdout.split() == ["False", "2"] and said in out.stderr, (flags, out.stderr[-800:])
        assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import peft_t5

    folder = tmp_path_factory.mktemp("extractive") / "adapter"
    return peft_t5.train(task="squad_extractive", output_dir=str(folder), lora_r=4, **QUICK)


@pytest.mark.slow
def test_an_extractive_adapter_is_a_plain_peft_question_answering_folder(trained, records, tokenizer):
    import torch
    from peft import PeftModel

    from peft_t5.extractive import answer_records
    from peft_t5.modeling import tiny_model

    folder = trained.output_dir
    config = json.loads(open(f"{folder}/adapter_config.json").read())
    meta = json.loads(open(f"{folder}/peft_t5.json").read())
    assert config["task_type"] == "QUESTION_ANS" and meta["task"] == "squad_extractive" and meta["head"] == "span"
    for key in ("eval_exact", "eval_f1", "eval_HasAns_f1", "eval_NoAns_f1", "eval_best_f1", "eval_best_f1_thresh"):
        assert key in trained.metrics, sorted(trained.metrics)
    assert meta["na_threshold"] == trained.metrics["eval_best_f1_thresh"]
    model = PeftModel.from_pretrained(tiny_model(span_head=True), folder).eval()
    head = dict(model.named_parameters())
    trained_head = [n for n in head if "qa_outputs" in n and "modules_to_save" in n]
    assert trained_head  # the new span head is saved beside the adapter, not left at its random start
    assert not torch.equal(head[trained_head[0]], tiny_model(span_head=True).qa_outputs.weight)
    answers = answer_records(model, tokenizer, records[:40], max_length=96, doc_stride=32)
    assert all(a.answer(t) == "" or a.answer(t) in r["context"]
               for a, r in zip(answers, records[:40]) for t in (-1e9, 0.0, 1e9))
    assert any(a.text for a in answers)


@pytest.mark.slow
def test_the_training_log_shows_windows_and_span_answers(tmp_path):
    out = subprocess.run([sys.executable, "scripts/train_lora.py", "--task", "squad_extractive", "--output_dir",
                          str(tmp_path / "a"), *[f"--{k}={v}" for k, v in QUICK.items()]],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "contexts split into overlapping windows" in out.stdout and "sample answers from the reloaded adapter" \
        in out.stdout, out.stdout[-3000:]
    answers = [line.split("generated: ", 1)[1] for line in out.stdout.splitlines() if "generated: " in line]
    assert len(answers) == 3


@pytest.mark.slow
def test_evaluate_writes_span_answers_and_the_official_scores_agree_from_its_files(trained, records, tmp_path):
    import peft_t5
    from peft_t5.metrics.squad_v2 import main as official

    out = tmp_path / "preds.json"
    result = peft_t5.evaluate(task="squad_extractive", adapter=trained.output_dir, predictions=str(out), limit=40,
                              max_source_length=96)
    written = json.loads(out.read_text())
    contexts = {r["id"]: r["context"] for r in records}
    assert len(written) == 40 and all(a == "" or a in contexts[q] for q, a in written.items())
    assert result.na_threshold == trained.metrics["eval_best_f1_thresh"]  # the one recorded with the adapter
    for key in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"):
        assert key in result.metrics
    na_prob = out.with_name("preds.na_prob.json")
    scored = tmp_path / "official.json"
    assert official([SAMPLE, str(out), "-n", str(na_prob), "-t", repr(result.na_threshold), "-o", str(scored)]) == 0
    again = json.loads(scored.read_text())
    assert again["total"] == 40 and again["exact"] == pytest.approx(result.metrics["exact"])
    assert again["f1"] == pytest.approx(result.metrics["f1"])


@pytest.mark.slow
def test_an_extractive_adapter_merges_into_a_plain_question_answering_model(trained, records, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering

    import peft_t5
    from peft_t5.extractive import answer_records
    from peft_t5.modeling import tiny_model

    report = peft_t5.merge(trained.output_dir, str(tmp_path / "merged"))
    assert report.max_logit_diff <= report.tolerance
    merged = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    adapter = PeftModel.from_pretrained(tiny_model(span_head=True), trained.output_dir).eval()
    options = dict(max_length=96, doc_stride=32)
    ours, theirs = (answer_records(m, tokenizer, records[:24], **options) for m in (merged, adapter))
    assert [a.text for a in ours] == [a.text for a in theirs]
    assert max(abs(a.null_margin - b.null_margin) for a, b in zip(ours, theirs)) < 1e-3
    assert json.loads((tmp_path / "merged" / "peft_t5.json").read_text())["head"] == "span"


@pytest.fixture(scope="module")
def side_by_side(trained, tmp_path_factory):
    """An abstractive squad adapter beside the extractive one, each one's answers to the first 12 sample records as
    evaluate.py gives them alone (at the source length each was trained with), and a bank of both."""
    from test_serve import make_adapter

    import peft_t5
    from peft_t5.bank import AdapterBank

    root = tmp_path_factory.mktemp("side_by_side")
    abstractive = make_adapter(root / "abstractive", "squad", 2)
    expected = {}
    for name, folder, task, length in (("spans", trained.output_dir, "squad_extractive", 96),
                                       ("abstractive", abstractive, "squad", 48)):
        peft_t5.evaluate(task=task, adapter=folder, predictions=str(root / f"{name}.json"), limit=12,
                         max_source_length=length)
        expected[name] = json.loads((root / f"{name}.json").read_text())
    return AdapterBank.load("tiny", {"abstractive": abstractive, "spans": trained.output_dir}), expected


@pytest.mark.slow
def test_an_extractive_and_an_abstractive_adapter_answer_side_by_side_as_evaluate_does_alone(side_by_side, records):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from peft_t5.serve.app import ServeSettings, create_app, running

    bank, expected = side_by_side
    inputs = [{"question": r["question"], "context": r["context"]} for r in records[:12]]
    with running(create_app(bank, ServeSettings(compile=False))) as url, ThreadPoolExecutor(2) as pool:
        asked = {name: pool.submit(httpx.post, f"{url}/v1/generate", json={"adapter": name, "inputs": inputs},
                                   timeout=300) for name in ("spans", "abstractive")}
        replies = {name: reply.result() for name, reply in asked.items()}
        kinds = {a["name"]: a["kind"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]}
    assert all(reply.status_code == 200 for reply in replies.values()), {k: r.text for k, r in replies.items()}
    for name, reply in replies.items():
        assert [o["output"] for o in reply.json()["outputs"]] == [expected[name][r["id"]] for r in records[:12]]
    spans = replies["spans"].json()["outputs"]
    assert all(o["raw"] and o["raw"] in i["context"] and o["output"] in ("", o["raw"]) for o, i in zip(spans, inputs))
    assert all((o["output"] == "") == (o["finish_reason"] == "no_answer") for o in spans)
    assert kinds == {"base": "generative", "abstractive": "generative", "spans": "extractive"}


@pytest.mark.slow
def test_an_extractive_adapter_is_refused_in_one_line_where_it_cannot_answer(side_by_side, records):
    import httpx

    from peft_t5.serve.app import ServeSettings, create_app, running

    bank, _ = side_by_side
    question = {"question": records[0]["question"], "context": records[0]["context"]}
    with running(create_app(bank, ServeSettings(compile=False))) as url:
        sampled = httpx.post(f"{url}/v1/generate", json={"adapter": "spans", "inputs": [question], "temperature": 0.7})
        bare = httpx.post(f"{url}/v1/generate", json={"adapter": "spans", "inputs": ["In what country is Normandy?"]})
        completion = httpx.post(f"{url}/v1/completions", json={"model": "spans", "prompt": "Where?"})
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        card = httpx.get(f"{url}/v1/models/spans")
    assert sampled.status_code == 422 and sampled.json() == {
        "error": "temperature: 'spans' is an extractive adapter: it answers a question about a context with a span "
                 "of it, not by decoding; leave temperature out", "field": "temperature"}
    assert bare.status_code == 422 and bare.json()["field"] == "inputs[0]" and "send {question, context}" in \
        bare.json()["error"]
    for reply in (completion, card):
        assert reply.status_code == 422 and reply.json()["error"]["message"].startswith(
            "model: 'spans' is an extractive adapter") and "POST /v1/generate" in reply.json()["error"]["message"]
    assert listed == ["base", "abstractive"]


@pytest.mark.slow
def test_span_requests_take_one_forward_pass_together_between_the_steps_of_a_decoding_request(side_by_side,
                                                                                            records, monkeypatch):
    """Two span requests (5 inputs in all) and a generative one are queued while the engine is held; once released,
    the span inputs are read in one forward pass while the generative rows decode, and each answers as the bank
    answers it alone."""
    import asyncio

    import peft_t5.extractive as extractive
    from peft_t5.serve.engine import Engine

    bank, _ = side_by_side
    passes = []
    real = extractive.span_logits
    monkeypatch.setattr(extractive, "span_logits", lambda model, tokenizer, wins, batch_size: (
        passes.append(len(wins.input_ids)), real(model, tokenizer, wins, batch_size))[1])
    inputs = [{"question": r["question"], "context": r["context"]} for r in records[:5]]

    async def main():
        engine = Engine(bank, compile=False, max_encode_tokens=100_000)
        engine.start()
        try:
            with engine.holding():
                asked = [asyncio.ensure_future(engine.extract("spans", inputs[:2])),
                         asyncio.ensure_future(engine.generate(["abstractive"], ["question: a context: b"], 12)),
                         asyncio.ensure_future(engine.extract("spans", inputs[2:]))]
                await asyncio.get_running_loop().run_in_executor(None, engine.wait_until,
                                                                 lambda: len(engine.spans) == 2)
            return await asyncio.gather(*asked)
        finally:
            await engine.stop()
    first, generated, second = asyncio.run(main())
    windows = len(extractive.windows(bank.span_records("spans", inputs), bank.tokenizer,
                                     **{k: v for k, v in bank.span_options("spans").items() if k != "max_answer_length"}).input_ids)
    assert passes == [windows] and windows > 5  # one pass over every window of both requests (contexts are split)
    threshold = bank.span_threshold("spans")
    assert [s.answer(threshold) for s in first + second] == bank.answer_spans("spans", inputs)
    assert len(generated) == 1


def test_span_inputs_waiting_count_in_the_queue_that_decoding_requests_share(side_by_side, records):
    """max_queue_rows bounds extractive inputs and decoding rows together: neither kind can crowd out the limit."""
    import asyncio

    from peft_t5.serve.engine import Engine
    from peft_t5.serve.failures import Busy

    bank, _ = side_by_side
    inputs = [{"question": r["question"], "context": r["context"]} for r in records[:2]]

    async def main():
        engine = Engine(bank, compile=False, max_queue_rows=3)
        engine.start()
        try:
            with engine.holding():
                spans = asyncio.ensure_future(engine.extract("spans", inputs))
                await asyncio.get_running_loop().run_in_executor(None, engine.wait_until,
                                                                 lambda: engine.waiting_rows == 2)
                with pytest.raises(Busy, match="^2 rows are waiting, the most this server queues is 3"):
                    await engine.generate(["abstractive"] * 2, ["question: a context: b"] * 2, 4)
                with pytest.raises(Busy, match="^2 rows are waiting"):
                    await engine.extract("spans", inputs)
            return await spans
        finally:
            await engine.stop()
    assert len(asyncio.run(main())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ia3", "full"])
def test_other_methods_train_a_span_head_too(method, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    import peft_t5

    result = peft_t5.train(task="squad_extractive", method=method, output_dir=str(tmp_path / "a"),
                           **{**QUICK, "sample_generations": 0})
    assert "eval_f1" in result.metrics
    if method == "full":  # a whole T5ForQuestionAnswering
        assert type(AutoModelForQuestionAnswering.from_pretrained(tmp_path / "a")).__name__ == "T5ForQuestionAnswering"
    else:
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["task_type"] == "QUESTION_ANS" and config["modules_to_save"] == ["qa_outputs"]


def test_a_span_heads_threshold_is_a_logit_margin_and_any_other_a_probability():
    from pathlib import Path

    from peft_t5.errors import PeftT5Error
    from peft_t5.metadata import check_metadata

    assert check_metadata({"head": "span", "na_threshold": -2.5}, Path("a/peft_t5.json"))["na_threshold"] == -2.5
    with pytest.raises(PeftT5Error, match=r"a/peft_t5.json: na_threshold: 3 is a no-answer probability: it must be "
                                          r"from 0 to 1"):
        check_metadata({"na_threshold": 3}, Path("a/peft_t5.json"))


@pytest.mark.slow
def test_qlora_trains_a_span_head_in_full_precision_on_the_4bit_base_and_merges(tmp_path):
    import peft_t5

    result = peft_t5.train(task="squad_extractive", qlora=True, output_dir=str(tmp_path / "a"),
                           **{**QUICK, "sample_generations": 0})
    meta = json.loads((tmp_path / "a" / "peft_t5.json").read_text())
    assert meta["qlora"] and meta["quantization"]["llm_int8_skip_modules"] == ["qa_outputs"]
    assert "eval_f1" in result.metrics
    report = peft_t5.merge(str(tmp_path / "a"), str(tmp_path / "m"))
    assert report.merge_into == "dequantized" and report.max_logit_diff <= report.tolerance
