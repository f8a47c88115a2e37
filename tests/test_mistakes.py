"""A new user's mistakes: nothing of theirs is destroyed (output folders with their files, merging onto the adapter,
two runs into one folder), and every ordinary mistake is one line, not a traceback (subprocesses where it is the
command line that is tested)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import FAST, run_cli, run_cli_alone
from test_serve import KEY, make_adapter, post

from peft_t5.adapters import ADAPTER_FILES
from peft_t5.cli import main, run
from peft_t5.commands.train import train_main as train
from peft_t5.compare import rating_summary
from peft_t5.errors import PeftT5Error
from peft_t5.tasks import get_task
from peft_t5.train_settings import parse_command_line as parse_train_args
from peft_t5.training import load_data, shown

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def peft_t5(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_t5", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env or OFFLINE, timeout=300, **kwargs)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The whole of stderr, which must be one line (and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("mistakes") / "jokes"
    train(["--task", "jokes", "--output_dir", str(out), *FAST])
    return out


# 1. an output folder holding the user's files


@pytest.mark.slow
def test_an_output_folder_of_the_users_files_is_refused_and_with_overwrite_they_are_kept(tmp_path, capsys):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "notes.txt").write_text("notes")
    (project / "data").mkdir()
    (project / "data" / "a.csv").write_text("a,b")
    argv = ["--task", "jokes", "--output_dir", str(project), *FAST]
    status, line = run_cli(train, argv, capsys)
    assert status == 2 and line == (f"error: --output_dir {project} holds files peft-t5 did not write (data, notes.txt);"
                                    " pass a new or empty folder, or --overwrite_output_dir to save the adapter beside "
                                    "them (they are kept)")
    assert sorted(p.name for p in project.iterdir()) == ["data", "notes.txt"]
    (tmp_path / ".myproject.lock").write_text("999999\n")  # a lock left by a run that died: not held, so taken
    for _ in range(2):  # a new adapter, then a replaced one: the user's files stay
        assert run(train, argv + ["--overwrite_output_dir"]) == 0
        assert (project / "notes.txt").read_text() == "notes" and (project / "data" / "a.csv").read_text() == "a,b"
        assert all((project / f).is_file() for f in ADAPTER_FILES)
    assert not (tmp_path / ".myproject.lock").exists()


# 2. merging onto the adapter


@pytest.mark.slow
@pytest.mark.parametrize("where, said", [("same", "is"), ("inside", "lies inside"), ("parent", "holds")])
def test_merge_refuses_an_output_that_is_inside_or_holds_the_adapter(adapter, tmp_path, where, said, capsys):
    copy = tmp_path / "adapters" / "jokes"
    shutil.copytree(adapter, copy)
    output = {"same": copy, "inside": copy / "merged", "parent": copy.parent}[where]
    status, line = run_cli_alone(main.__globals__["command"]("merge"), ["--adapter", str(copy), "--output_dir",
                                                                         str(output), "--overwrite_output_dir"], capsys)
    assert status == 2
    assert line == (f"error: --output_dir {output} {said} the adapter folder {copy}: the merged model would "
                    "replace the adapter; pass a folder elsewhere, e.g. --output_dir merged/jokes")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in adapter.iterdir())


def test_merge_overwrite_replaces_a_merged_models_files_and_keeps_the_users(adapter, tmp_path, capsys):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    (merged / "model-00001-of-00002.safetensors").write_text("an old shard")
    assert run_cli(main.__globals__["command"]("merge"), ["--adapter", str(adapter), "--output_dir", str(merged)],
                   capsys)[0] == 2
    assert run(main.__globals__["command"]("merge"), ["--adapter", str(adapter), "--output_dir", str(merged),
                                                      "--overwrite_output_dir"]) == 0
    assert (merged / "notes.txt").read_text() == "mine" and (merged / "model.safetensors").is_file()
    assert not (merged / "model-00001-of-00002.safetensors").exists()


# 3 and 5. two runs into one folder; Ctrl-C


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first_and_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "jokes"
    argv = ["train", "--task", "jokes", "--output_dir", out, *FAST[:2], "--max_steps", "1000000", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end",
            "false", "--eval_on_start", "false", "--save_total_limit", "3", "--max_source_length", "64"]
    first = subprocess.Popen([sys.executable, "-m", "peft_t5", *map(str, argv)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=OFFLINE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal,
    # even where the tests run as a background job (which ignores SIGINT, and so would the training it starts)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = peft_t5(*argv)
        assert second.returncode == 2
        assert one_line(second) == (f"error: --output_dir {out}: another training (process {first.pid}) is writing "
                                    "to it; wait for it to end, or pass another --output_dir")
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert last.startswith("interrupted at step ") and f"{out}/checkpoints/checkpoint-" in last
    assert last.endswith(" --save_total_limit 3 --max_source_length 64 --resume") and "continue with: " in last
    assert "kernels-community" not in stdout + stderr  # bitsandbytes' optional-kernel warning stays out
    assert not (tmp_path / ".jokes.lock").exists()


def test_a_ctrl_c_that_python_drops_in_a_destructor_still_stops_training(tmp_path, monkeypatch, capsys):
    """Python drops a KeyboardInterrupt raised inside __del__ ("Exception ignored in ..."); training must still stop,
    at the end of that step, as after any Ctrl-C."""
    from peft_t5.trainer import TaskTrainer

    class PressedWhileCollected:
        def __del__(self):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what Python runs on Ctrl-C, here: dropped

    out = tmp_path / "jokes"
    argv = ["--task", "jokes", "--output_dir", str(out), *FAST[:2], "--max_steps", "50", *FAST[4:]]
    training_step = TaskTrainer.training_step

    def pressed_during_step_2(self, *args, **kwargs):
        if self.state.global_step == 1:
            PressedWhileCollected()
        return training_step(self, *args, **kwargs)

    dropped = []
    monkeypatch.setattr(TaskTrainer, "training_step", pressed_during_step_2)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job's
    try:  # tests ignore SIGINT, and training then leaves it so)
        assert run(train, argv) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert dropped == [KeyboardInterrupt]  # it was dropped, as Python does
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted at step 2; {out}/checkpoints/checkpoint-2 is kept"), last


@pytest.mark.slow
def test_ctrl_c_during_the_final_evaluation_keeps_the_steps_trained(tmp_path, monkeypatch, capsys):
    from peft_t5.trainer import TaskTrainer

    out = tmp_path / "jokes"
    argv = ["--task", "jokes", "--output_dir", str(out), *FAST[:2], "--max_steps", "3", *FAST[4:]]
    evaluate = TaskTrainer.evaluate

    def interrupted_at_the_end(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(TaskTrainer, "evaluate", interrupted_at_the_end)
    assert run(train, argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted at step 3; {out}/checkpoints/checkpoint-3 is kept (saved now, the steps "
                           "trained so far); continue with: ") and last.endswith(" --resume"), last
    monkeypatch.undo()
    assert run(train, [*argv, "--resume"]) == 0
    assert json.loads((out / "peft_t5.json").read_text())["training_args"]["max_steps"] == 3
    assert (out / "adapter_model.safetensors").is_file()


# 4. a model that cannot be loaded


@pytest.mark.parametrize("flags, message", [
    ([], "error: the jokes task's base model (--model to choose another): google/flan-t5-large: not a local folder, "
          "and the Hub is off (HF_HUB_OFFLINE is set) with no copy in the local cache; pass a local model folder or "
          "tiny, or unset HF_HUB_OFFLINE to download it"),
    (["--model", "/no/such/folder"], "error: --model: /no/such/folder: no such folder; pass a local model folder "
                                     "(with config.json), a Hub id, or tiny"),
    (["--model", "Tiny"], "error: --model: Tiny: no such model; did you mean tiny?"),
])
def test_a_model_that_cannot_be_loaded_is_one_line_saying_why(flags, message):
    proc = peft_t5("train", "--task", "jokes", "--data", "peft_t5/data/jokes_sample.csv", *flags)
    assert proc.returncode == 2 and one_line(proc) == message


def test_an_unreachable_hub_is_one_line_at_once_not_a_minute_of_retries():
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        online = {k: v for k, v in OFFLINE.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        proc = peft_t5("train", "--task", "jokes", "--data", "peft_t5/data/jokes_sample.csv", "--model", "google/t5-x",
                       env={**online, "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}",
                            "HF_HOME": str(ROOT / "no-such-hf-home")})
    assert proc.returncode == 2
    assert one_line(proc) == ("error: --model: google/t5-x: the Hub cannot be reached ([Errno 111] Connection refused) "
                              "and no copy is in the local cache; pass a local model folder or tiny, or check the "
                              "network (HF_ENDPOINT, proxies)")


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path):
    from peft_t5.modeling import load_tokenizer, tiny_config

    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(PeftT5Error, match=f"^{tmp_path}: cannot load its tokenizer \\(no tokenizer.json or spiece.model in the folder\\); copy"):
        load_tokenizer(str(tmp_path))


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(capsys):
    def evaluate_interrupted(argv):
        raise KeyboardInterrupt

    assert run(evaluate_interrupted, []) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C); what was finished before it is kept\n"


# 6, 7. settings checked at parse time, before anything loads


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "0"], "error: --max_new_tokens 0: must be from 1 to 1024"),
    (["--max_new_tokens", "100000"], "error: --max_new_tokens 100000: must be from 1 to 1024"),
    (["--num_beams", "0"], "error: --num_beams 0: must be from 1 to 16"),
])
def test_generate_checks_its_numbers_at_parse_time(adapter, flags, message):
    proc = peft_t5("generate", "--adapter", f"jokes={adapter}", "--adapter_name", "jokes", "Why?", *flags)
    assert proc.returncode == 2 and one_line(proc) == message


@pytest.mark.parametrize("where, message", [
    ("/sys/peft_t5_predictions/preds.json", "error: --predictions /sys/peft_t5_predictions/preds.json: cannot write in "
                                           "/sys (Permission denied); pass a path you can write to"),
    ("FILE/preds.json", "error: --predictions {tmp}/FILE/preds.json: lies under {tmp}/FILE, a file; pass a path in a folder"),
])
def test_evaluate_refuses_predictions_it_cannot_write_before_loading(tmp_path, where, message):
    (tmp_path / "FILE").write_text("x")
    target = where if where.startswith("/") else str(tmp_path / where)
    code = ("import sys; from peft_t5.cli import main; rc = main(['evaluate', *sys.argv[1:]]); "
            "assert 'torch' not in sys.modules, 'loaded torch first'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--task", "jokes", "--model", "tiny", "--predictions", target],
                          capture_output=True, text=True, cwd=ROOT, env=OFFLINE)
    assert proc.returncode == 2 and one_line(proc) == message.format(tmp=tmp_path)


# 8. only the main process of a launch speaks


def test_under_a_launcher_only_the_main_process_prints_the_error():
    assert peft_t5("train", "--task", "jokez", env={**OFFLINE, "RANK": "1"}).stderr == ""
    assert one_line(peft_t5("train", "--task", "jokez", env={**OFFLINE, "RANK": "0"})).startswith("error: ")


# 9. messages that name the right flag and fix


def test_compare_names_its_own_flag_for_a_missing_questions_file():
    proc = peft_t5("compare", "--questions", "nofile.csv", "--adapter", "jokes=x")
    assert proc.returncode == 2
    assert one_line(proc) == "error: nofile.csv: no such file; pass a jokes CSV or JSON file"


@pytest.mark.parametrize("task, name, content, message", [
    ("jokes", "jokes.xlsx", b"PK\x03\x04", "jokes.xlsx: a spreadsheet, not a text file; save it as CSV"),
    ("squad", "squad.csv", b"question,answer\nWhy?,Because\n", "squad.csv: a CSV file; the squad task reads SQuAD v2.0 "
                                                               "JSON (data -> paragraphs -> qas"),
    ("jokes", "empty.csv", b"", "empty.csv: the file has no rows (a header at most); add question-answer rows"),
    ("jokes", "header.csv", b"Question,Answer\n", "header.csv: the file has no rows (a header at most)"),
])
def test_data_files_of_the_wrong_kind_say_what_to_do(tmp_path, capsys, task, name, content, message):
    (tmp_path / name).write_bytes(content)
    status, line = run_cli(train, ["--task", task, "--data", str(tmp_path / name), "--output_dir",
                                   str(tmp_path / "out"), *FAST], capsys)
    assert status == 2 and message in line, line
    assert not (tmp_path / "out").exists()


# 10. the same adapter name twice


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_same_adapter_name_twice_is_refused(adapter, command):
    extra = ["--adapter_name", "jokes", "Why?"] if command == "generate" else []
    proc = peft_t5(command, "--adapter", f"jokes={adapter}", "--adapter", f"jokes={adapter}/../jokes", *extra)
    assert proc.returncode == 2
    assert one_line(proc) == (f"error: --adapter jokes={adapter}/../jokes: the name 'jokes' is given twice ({adapter} "
                              f"and {adapter}/../jokes); give each adapter its own name")


# 11. the NaN message when nothing was saved yet


def test_the_nan_message_says_when_no_checkpoint_was_saved(tmp_path):
    from peft_t5.trainer import StopOnNonFiniteLoss

    args = type("Args", (), {"output_dir": str(tmp_path / "checkpoints")})()
    with pytest.raises(PeftT5Error, match="^the training loss became nan at step 1; stopped, no checkpoint was saved "
                                          "before it; lower --learning_rate"):
        StopOnNonFiniteLoss(torch.nn.Linear(1, 1)).on_log(args, type("S", (), {"global_step": 1})(), None,
                                                          logs={"loss": float("nan")})


# 12, 13. serve: --trust_pickle, a port in use


def test_serve_has_trust_pickle_for_run_time_loads_of_pickled_adapters(tmp_path):
    from safetensors.torch import load_file

    from peft_t5.bank import AdapterBank
    from peft_t5.serve.app import ServeSettings, create_app, running

    jokes, pickled = make_adapter(tmp_path / "jokes", "jokes", 1), tmp_path / "pickled"
    shutil.copytree(jokes, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert "--trust_pickle" in peft_t5("serve", "--help").stdout
    for trust, status in ((False, 422), (True, 201)):
        bank = AdapterBank.load("tiny", {"jokes": jokes})
        with running(create_app(bank, ServeSettings(compile=False, api_key=KEY, adapter_root=str(tmp_path), trust_pickle=trust))) as url:
            reply = post(url, "/v1/adapters", {"name": "pickled", "path": "pickled"})
            assert reply.status_code == status, reply.text
            assert trust or "pickled weights can run code when loaded and are refused" in reply.json()["error"]


@pytest.mark.slow
def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_or_announcing(tmp_path):
    jokes = make_adapter(tmp_path / "jokes", "jokes", 1)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = peft_t5("serve", "--adapter", f"jokes={jokes}", "--port", port)
    assert proc.returncode == 2 and "serving" not in proc.stdout
    assert one_line(proc) == (f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
                              "pass another --port, or stop the program that holds it")


# 14. commands: a typo, one usage style, help for every flag, help without the heavy imports


def test_a_misspelled_command_gets_a_suggestion():
    proc = peft_t5("trian")
    assert proc.returncode == 2 and proc.stderr.splitlines()[0] == "peft-t5: unknown command 'trian'; did you mean train?"


@pytest.mark.parametrize("name", ["evaluate", "generate", "compare", "merge", "estimate", "serve"])
def test_every_flag_has_help_usage_names_the_command_and_help_needs_no_torch(name):
    import importlib

    module = importlib.import_module(f"peft_t5.commands.{name}")
    parser = module.build_parser()
    assert parser.prog == f"peft-t5 {name}"
    assert [a.dest for a in parser._actions if not a.help] == []
    code = (f"import sys; from peft_t5.cli import main; rc = main(['{name}', '--help']) if False else None\n"
            f"try:\n    main(['{name}', '--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('torch' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=OFFLINE)
    assert proc.stdout.splitlines()[-1] == "False 0" and proc.stdout.startswith(f"usage: peft-t5 {name}")


def test_train_flags_of_the_toolkit_all_have_help():
    from transformers import HfArgumentParser

    from peft_t5.arguments import DataArguments, LoraArguments, ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments))
    assert [a.dest for a in parser._actions if not a.help] == []


# 15. the rating summary stays on the scale


def test_the_rating_interval_stays_within_1_to_5():
    summary = rating_summary({"jokes": {"funny": [1.0, 5.0]}, "base": {"funny": [5.0, 5.0, 4.0]}})
    low, high = summary["jokes"]["funny"]["ci95"]
    assert (low, high) == (1.0, 5.0)  # unclipped: -0.92 to 6.92
    assert 4.0 <= summary["base"]["funny"]["ci95"][0] and summary["base"]["funny"]["ci95"][1] == 5.0


# 16. wording: an empty jokes output, where the records came from


def test_an_empty_output_is_worded_for_its_task_and_records_are_credited_to_their_files(capsys):
    assert shown(get_task("jokes"), "") == "(empty output)" and shown(get_task("squad"), "") == "(no answer)"
    sample = get_task("squad").sample
    _, data_args, _, training_args = parse_train_args(["--task", "squad", "--data", sample, "--validation_data",
                                                       sample, "--max_train_samples", "5"])
    said = []
    load_data(get_task("squad"), data_args, training_args, said.append)
    assert said[0].endswith(f"(training from {sample}, validation from {sample})"), said[0]


@pytest.mark.slow
def test_importing_the_bank_says_nothing_of_bitsandbytes_optional_kernels():
    """bitsandbytes logs it at import on CPUs with AVX512-BF16 (not every machine here has them: the record is sent
    as bitsandbytes sends it), and a notebook importing the bank has no logging of its own set up."""
    code = ("import logging, peft_t5.bank; logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
            "'Failed to load CPU gemm_4bit_forward from kernels-community: no module. Please make sure'); "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=OFFLINE)
    assert proc.returncode == 0 and "kernels-community" not in proc.stderr and "another warning" in proc.stderr
