"""Issue 6: bad input gets one line and exit 2 with nothing written; kills and NaNs lose nothing; no pickles."""
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_t5.cli import run
from peft_t5.commands.generate import generate_main
from peft_t5.commands.merge import merge_main
from peft_t5.commands.train import train_main as train
from peft_t5.errors import DataError, PeftT5Error
from peft_t5.tasks import get_task, jokes, squad

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--max_steps", "2", "--report_to", "none", "--sample_generations", "0",
        "--max_source_length", "64", "--generation_eval_samples", "2", "--disable_tqdm", "true"]
QUICK = dict(model="tiny", max_steps=2, report_to="none", sample_generations=0, max_source_length=64,
             generation_eval_samples=2, disable_tqdm=True)  # FAST, as peft_t5.train's keywords


def run_cli(command, argv, capsys):
    status = run(command, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return status, (err[-1] if err else "")


def run_cli_alone(command, argv, capsys) -> tuple[int, str]:
    """A command in this process: its status and its whole stderr, which must be one line (no traceback)."""
    status = run(command, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return status, lines[0]


def squad_json(qas, context="The alpha beta gamma."):
    return json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]})


def answerable(i, text="alpha", start=4):
    return {"id": f"q{i}", "question": f"What is {i}?", "is_impossible": False,
            "answers": [{"text": text, "answer_start": start}]}


BAD_DATA = [
    ("squad", "missing.json", None, "missing.json: no such file"),
    ("squad", "latin1.json", "caf\xe9".encode("latin-1"), "not a UTF-8 JSON file"),
    ("squad", "broken.json", b'{"data": [', "not a UTF-8 JSON file (Expecting value"),
    ("squad", "layout.json", b'{"articles": []}', "not the SQuAD v2.0 layout"),
    ("squad", "nested.json", b'{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": "oops"}]}]}',
     "not the SQuAD v2.0 layout"),
    ("squad", "empty.json", squad_json([{"id": "a", "question": "", "answers": []}]).encode(),
     "none of its 1 questions is usable"),
    # neither UTF-8 nor Windows-1252 (whose Latin-1 letters now read, with a warning): 0x81 is in neither
    ("jokes", "binary.csv", b"Question,Answer\ncaf\x81?,x\n", "not UTF-8"),
    ("jokes", "quotes.csv", b'Question,Answer\n"Why?"x,y\n', "not a valid CSV file"),
    ("jokes", "columns.csv", b"setup,punch\nWhy?,x\n", "record 0 has columns ['punch', 'setup']; expected Question/Answer or title/body"),
    ("jokes", "broken.json", b"[{\"title\": ", "neither JSON nor JSON lines"),
    ("jokes", "nothing.csv", b"Question,Answer\nNot a question.,x\n,\n", "none of 1 records is a question-answer joke"),
]


@pytest.mark.parametrize("task,name,content,message", BAD_DATA, ids=[c[1] for c in BAD_DATA])
def test_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, task, name, content, message):
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    status, line = run_cli(train, ["--task", task, "--data", str(data), "--output_dir", str(out), *FAST], capsys)
    assert status == 2
    assert line.startswith(f"error: {data}") and message in line, line
    assert not out.exists()


def test_records_with_empty_fields_are_counted_and_skipped(tmp_path, caplog):
    path = tmp_path / "squad.json"
    qas = [answerable(1), {"id": "q2", "question": " ", "answers": []}, answerable(3),
           {"id": "q4", "question": "Q?", "is_impossible": False, "answers": []}, answerable(5, "delta", 4)]
    path.write_text(squad_json(qas))
    with caplog.at_level(logging.WARNING):
        records = squad.read_squad_v2(str(path))
    assert [r["id"] for r in records] == ["q1", "q3", "q5"]
    assert "skipped 2 of 5 questions with a missing or empty field (first: question 1)" in caplog.text
    assert "in 1 questions the answer text is not at answer_start in the context (first: id q5)" in caplog.text
    jokes_file = tmp_path / "j.csv"
    jokes_file.write_text("Question,Answer\nWhy?,Because.\n,Orphan answer\nHow?,\n")
    with caplog.at_level(logging.WARNING):
        assert jokes.read_jokes(str(jokes_file)) == [{"question": "Why?", "answer": "Because."}]
    assert "skipped 2 of 3 records with an empty Question or Answer (first: record 1)" in caplog.text


@pytest.mark.parametrize("flags,message", [
    (["--lora_r", "0"], "error: --lora_r 0: the rank must be at least 1"),
    (["--lora_dropout", "1.5"], "error: --lora_dropout 1.5: must be in [0, 1)"),
    (["--eval_strategy", "steps", "--eval_steps", "-3"],
     "error: --eval_steps -3: must be more than 0 (a number of steps, or under 1 a share of the run's steps)"),
    (["--save_steps", "0"], "error: --save_steps 0: must be more than 0 (a number of steps, or under 1 a share of "
                            "the run's steps)"),
    (["--target_modules", "query", "v"], "error: --target_modules query match no layer of this model; its linear layers are named: k, lm_head, o, q, v, wi_0, wi_1, wo"),
])
def test_lora_settings_out_of_range(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    status, line = run_cli(train, ["--task", "jokes", "--output_dir", str(out), *FAST, *flags], capsys)
    assert (status, line) == (2, message) and not out.exists()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "jokes"
    train(["--task", "jokes", "--output_dir", str(out), *FAST])
    return out


def broken_copy(adapter, tmp_path, name, change):
    import shutil

    copy = tmp_path / name
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    change(copy)
    return copy


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_ADAPTERS = [
    ("no-config", lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json, so not an adapter folder"),
    ("no-weights", lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors, so no adapter weights"),
    ("truncated", lambda d: truncate(d / "adapter_model.safetensors"), "truncated or corrupt safetensors file"),
    ("bad-config", lambda d: (d / "adapter_config.json").write_text("{"), "adapter_config.json: not a PEFT adapter config"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,change,message", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_broken_adapter_folders_for_merge_and_generate(adapter, tmp_path, capsys, name, change, message):
    broken = broken_copy(adapter, tmp_path, name, change)
    status, line = run_cli(merge_main, ["--adapter", str(broken), "--output_dir", str(tmp_path / "merged")], capsys)
    assert status == 2 and line.startswith(f"error: {broken}") and message in line, line
    assert not (tmp_path / "merged").exists()
    status, line = run_cli(generate_main, ["--adapter", f"j={broken}", "--adapter_name", "j", "Why?"], capsys)
    assert status == 2 and message in line


def test_pickled_adapter_refused_unless_trusted(adapter, tmp_path, capsys):
    from safetensors.torch import load_file

    def to_pickle(d):
        torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
        (d / "adapter_model.safetensors").unlink()

    pickled = broken_copy(adapter, tmp_path, "pickled", to_pickle)
    status, line = run_cli(generate_main, ["--adapter", f"j={pickled}", "--adapter_name", "j", "Why?"], capsys)
    assert status == 2 and "adapter_model.bin: pickled weights can run code when loaded and are refused" in line
    status = run(generate_main, ["--adapter", f"j={pickled}", "--adapter_name", "j", "--trust_pickle", "Why?"])
    assert status == 0 and "Q: Why?" in capsys.readouterr().out


def test_pickled_base_model_refused_unless_trusted(tmp_path, capsys):
    from peft_t5.modeling import load_base_model, tiny_model

    model = tiny_model()
    model.config.save_pretrained(tmp_path / "base")
    torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    with pytest.raises(PeftT5Error, match=r"pickled .bin weights are refused unless you pass --trust_pickle"):
        load_base_model(str(tmp_path / "base"))
    trusted = load_base_model(str(tmp_path / "base"), trust_pickle=True)
    assert torch.equal(trusted.lm_head.weight, model.lm_head.weight)


def test_qlora_without_a_working_bitsandbytes(monkeypatch):
    import bitsandbytes.functional

    from peft_t5.modeling import check_bitsandbytes

    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    with pytest.raises(PeftT5Error, match=r"--qlora needs bitsandbytes with 4-bit support on this machine \(RuntimeError: no 4-bit kernel"):
        check_bitsandbytes()
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(PeftT5Error, match=r"--qlora needs bitsandbytes .*ModuleNotFoundError"):
        check_bitsandbytes()


def test_fields_of_a_record_are_data_never_code_or_paths():
    task = get_task("squad")
    record = {"question": "{__import__('os').system('touch /tmp/pwned')}", "context": "../../etc/passwd {context}"}
    assert task.source(record) == f"question: {record['question']} context: {record['context']}"
    assert not Path("/tmp/pwned").exists()


def save_slowly(out: str, value: float, writing) -> None:
    """Save an adapter whose LoRA weights all equal `value`, set `writing` once its weights are written, then take
    0.5 s before the rest (a window to be killed in)."""
    import time

    from peft_t5.adapters import save_adapter
    from peft_t5.modeling import add_lora, tiny_model, tiny_tokenizer

    model, tokenizer = add_lora(tiny_model()), tiny_tokenizer()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.fill_(value)
    slow = tokenizer.save_pretrained

    def pause_then_save(*args, **kwargs):
        writing.set()
        time.sleep(0.5)
        return slow(*args, **kwargs)
    tokenizer.save_pretrained = pause_then_save
    save_adapter(model, tokenizer, out, {"task": "jokes", "base_model": "tiny", "value": value}, "# card\n")


@pytest.mark.slow
def test_a_save_killed_part_way_leaves_the_old_or_the_new_adapter(tmp_path):
    import multiprocessing

    from peft import PeftModel

    from peft_t5.modeling import tiny_model

    # each save in a process of its own, forked from one that imported torch and PEFT once (~8 s each otherwise)
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["peft_t5.adapters", "peft_t5.modeling", "test_reliability"])
    out = tmp_path / "adapter"

    def save(value: float, kill_after: float | None = None) -> None:
        writing = processes.Event()
        child = processes.Process(target=save_slowly, args=(str(out), value, writing))
        child.start()
        if kill_after is not None:
            assert writing.wait(300)  # the new adapter's weights are being written now
            time.sleep(kill_after)  # where in the save the kill lands; the outcome must not depend on it
            child.kill()
        child.join()
        assert child.exitcode in ((0,) if kill_after is None else (0, -signal.SIGKILL))  # killed, or done first

    save(1.0)
    for delay in (0.0, 0.2, 0.45, 0.7):
        save(2.0, kill_after=delay)
        model = PeftModel.from_pretrained(tiny_model(), out)
        values = {p.data.unique().item() for n, p in model.named_parameters() if "lora_" in n}
        meta = json.loads((out / "peft_t5.json").read_text())
        assert values == {meta["value"]} and meta["value"] in (1.0, 2.0)  # whole old or whole new, never a mix
    save(3.0)
    assert json.loads((out / "peft_t5.json").read_text())["value"] == 3.0


RESUME = dict(task="jokes", model="tiny", max_steps=12, save_strategy="steps", save_steps=4, eval_strategy="no",
              eval_on_start=False, load_best_model_at_end=False, per_device_train_batch_size=32, report_to="none",
              sample_generations=0, logging_steps=1, disable_tqdm=True, seed=7)
KILLED = """
import json, os, signal, sys
from transformers import TrainerCallback
import peft_t5

class KilledAtStep(TrainerCallback):  # kill -9 in the middle of a step range, between two checkpoints
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            os.kill(os.getpid(), signal.SIGKILL)

peft_t5.train(**json.loads(sys.argv[1]), callbacks=(KilledAtStep(),))
"""


def adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_resumes_to_the_same_adapter(tmp_path):
    import peft_t5

    peft_t5.train(**RESUME, output_dir=str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED, json.dumps({**RESUME, "output_dir": str(killed)})],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]  # steps 5-7 are lost
    assert not (killed / "adapter_model.safetensors").exists()

    peft_t5.train(**RESUME, output_dir=str(killed), resume=True)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(killed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    state = json.loads((checkpoints / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from transformers import TrainerCallback

    from peft_t5.arguments import TrainingArguments
    from peft_t5.data import tokenize
    from peft_t5.modeling import add_lora, tiny_model, tiny_tokenizer
    from peft_t5.trainer import build_trainer

    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # the third step runs on a poisoned adapter
                next(p for n, p in model.named_parameters() if "lora_A" in n).data.fill_(float("nan"))

    tokenizer, task = tiny_tokenizer(), get_task("jokes")
    dataset, _ = tokenize(task, jokes.load_splits(jokes.SAMPLE)["train"][:16], tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=1, eval_strategy="no", eval_on_start=False,
                             load_best_model_at_end=False, report_to="none", dataloader_pin_memory=False,
                             disable_tqdm=True, logging_steps=1)
    trainer = build_trainer(add_lora(tiny_model()), tokenizer, task, dataset, None, args, [], 64, 32)
    trainer.add_callback(PoisonAtStep3())
    with pytest.raises(PeftT5Error, match=r"^the loss diverged \(adapter weights became NaN or infinite\) at step 3; "
                                          r"stopped, the last good checkpoint, .*run/checkpoint-2, is kept"):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints[-1] == "checkpoint-2"
    saved = adapter_weights(tmp_path / "run" / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in saved.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["data", "paragraphs", "qas", "context", "question", "id", "answers", "text",
                         "answer_start", "is_impossible", "title", "Question", "Answer", "body"]) | st.text(max_size=8),
        children, max_size=5),
    max_leaves=30)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, huge=st.booleans())
def test_fuzz_readers_load_or_raise_their_own_error(tmp_path, value, huge):
    text = json.dumps(value)
    if huge:
        text = text.replace('""', json.dumps("x" * 200_000), 1)
    for name, reader in (("f.json", squad.read_squad_v2), ("f.json", jokes.read_jokes), ("f.jsonl", jokes.read_jokes)):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        try:
            records = reader(str(path))
        except DataError:
            continue
        assert isinstance(records, list) and all(isinstance(r, dict) for r in records)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.text(max_size=30) | st.sampled_from(["Question", "Answer", "title", "body", "x" * 140_000]),
                              max_size=4), max_size=6), raw=st.binary(max_size=40))
def test_fuzz_csv_reader_loads_or_raises_its_own_error(tmp_path, rows, raw):
    import csv

    path = tmp_path / "f.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(path, "ab") as f:
        f.write(raw)
    for loader in (jokes.read_jokes, lambda p: jokes.load_splits(p)):
        try:
            loader(str(path))
        except DataError:
            pass


def edit_json(name, **changes):
    def change(folder):
        path = folder / name
        path.write_text(json.dumps(changes["whole"] if "whole" in changes else
                                   {**json.loads(path.read_text()), **changes}))
    return change


WRONG_TYPES = [  # well-formed JSON, wrong values: each was a 500 on the server or a traceback from the CLI
    ("meta-list", edit_json("peft_t5.json", whole=[]), "peft_t5.json: the file: Input should be a valid dictionary"),
    ("rank", edit_json("adapter_config.json", r=-1), "adapter_config.json: r: Input should be greater than or equal to 1"),
    ("template-number", edit_json("peft_t5.json", template=5), "peft_t5.json: template: Input should be a valid string"),
    ("template-field", edit_json("peft_t5.json", template="{question} {context}"),
     "peft_t5.json: template: '{question} {context}' needs context, which task 'jokes' does not fill"),
    ("length-text", edit_json("peft_t5.json", max_source_length="abc"),
     "peft_t5.json: max_source_length: Input should be a valid integer"),
    ("length-negative", edit_json("peft_t5.json", max_source_length=-5),
     "peft_t5.json: max_source_length: Input should be greater than or equal to 1"),
    ("task", edit_json("peft_t5.json", task="nope"), "peft_t5.json: task: unknown task 'nope'; known tasks: jokes, squad"),
]


@pytest.mark.parametrize("name,change,message", WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_adapter_files_with_wrong_types_are_refused_in_one_line_everywhere(adapter, tmp_path, capsys, name, change,
                                                                          message):
    from peft_t5.commands.evaluate import evaluate_main
    from peft_t5.commands.serve import parse_args
    from peft_t5.serve.server import check_settings as check_args

    broken = broken_copy(adapter, tmp_path, name, change)
    fix = "; restore the file train_lora.py wrote, or correct that field"
    for command, argv in ((merge_main, ["--adapter", str(broken), "--output_dir", str(tmp_path / "merged")]),
                          (generate_main, ["--adapter", f"j={broken}", "--adapter_name", "j", "Why?"]),
                          (evaluate_main, ["--task", "jokes", "--adapter", str(broken), "--model", "tiny",
                                          "--predictions", str(tmp_path / "preds.jsonl")])):
        status, line = run_cli(command, argv, capsys)
        assert status == 2 and line.startswith(f"error: {broken}/") and message in line and line.endswith(fix), line
    with pytest.raises(PeftT5Error, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_args(parse_args(["--adapter", f"j={broken}"]))
    assert not (tmp_path / "merged").exists()


def test_a_server_refuses_wrong_typed_adapter_folders_and_keeps_answering(adapter, tmp_path):
    import httpx

    from peft_t5.bank import AdapterBank
    from peft_t5.serve.app import ServeSettings, create_app, running

    for name, change, _ in WRONG_TYPES:
        broken_copy(adapter, tmp_path, name, change)
    with running(create_app(AdapterBank.load("tiny", {"jokes": str(adapter)}),
                            ServeSettings(compile=False, adapter_root=str(tmp_path)))) as url:
        for name, _, message in WRONG_TYPES:
            reply = httpx.post(url + "/v1/adapters", json={"name": name, "path": name})
            assert reply.status_code == 422 and message in reply.json()["error"], reply.text
        assert httpx.get(url + "/v1/adapters").status_code == 200
        completion = httpx.post(url + "/v1/completions", json={"model": "jokes", "prompt": "Why?", "max_tokens": 3})
        assert completion.status_code == 200
