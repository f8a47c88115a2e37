"""scripts/train_lora.py end to end in a subprocess, and its argument handling."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from peft_t5.errors import PeftT5Error
from peft_t5.train_settings import parse_command_line as parse_train_args

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "scripts" / "train_lora.py")]


def run_train(*args):
    return subprocess.run(TRAIN + list(args), capture_output=True, text=True, cwd=ROOT)


def error_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_train_squad_end_to_end_writes_a_loadable_adapter(tmp_path):
    out = tmp_path / "squad"
    proc = run_train("--task", "squad", "--model", "tiny", "--output_dir", str(out), "--max_steps", "6",
                     "--per_device_train_batch_size", "4", "--max_source_length", "128", "--max_eval_samples", "8",
                     "--generation_eval_samples", "4", "--sample_generations", "2", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainable params: 49,152 || all params: 1,492,736" in proc.stdout
    assert "sources truncated to fit; the answer was cut away in" in proc.stdout
    assert ("each evaluation: the loss on all 8 validation records, f1 on the outputs generated for the first 4 "
            "(--generation_eval_samples; --max_eval_samples caps both; evaluate.py scores a whole split)") in proc.stdout
    assert "sample generations from the reloaded adapter" in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "peft_t5.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "peft_t5.json").read_text())
    assert meta["task"] == "squad" and meta["base_model"] == "tiny"
    assert meta["template"] == "question: {question} context: {context}"
    assert meta["training_args"]["max_steps"] == 6 and meta["training_args"]["optim"] == "adafactor"
    assert {"eval_loss", "eval_exact", "eval_f1"} <= meta["metrics"].keys()

    from peft_t5.modeling import tiny_model

    model = PeftModel.from_pretrained(tiny_model(), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())

    again = run_train("--task", "squad", "--model", "tiny", "--output_dir", str(out), "--max_steps", "1")
    assert again.returncode == 2
    assert error_line(again) == f"error: {out} already holds an adapter; pass --overwrite_output_dir to replace it, or --output_dir for another folder"


def test_yaml_config_gives_the_same_arguments_as_flags(tmp_path):
    flags = ["--task", "jokes", "--model", "tiny", "--max_steps", "20", "--learning_rate", "0.0003",
             "--lora_r", "8", "--target_modules", "q", "k", "v", "--output_dir", "x"]
    config = tmp_path / "run.yaml"
    config.write_text("task: jokes\nmodel: tiny\nmax_steps: 20\nlearning_rate: 0.0003\nlora_r: 8\n"
                      "target_modules: [q, k, v]\noutput_dir: x\n")
    from_flags, from_yaml = parse_train_args(flags), parse_train_args([str(config)])
    for a, b in zip(from_flags, from_yaml):
        assert a == b
    model, data, lora, training = from_flags
    assert (lora.lora_r, lora.target_modules, training.max_steps, training.learning_rate) == (8, ["q", "k", "v"], 20, 3e-4)
    assert training.optim == "adafactor"


def test_fp16_is_refused_in_one_line(tmp_path, capsys):
    from peft_t5.cli import command, run

    argv = ["--task", "jokes", "--model", "tiny", "--fp16", "--use_cpu", "--max_steps", "1", "--output_dir",
            str(tmp_path / "out")]
    assert run(command("train"), argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --fp16 is refused for T5: its activations overflow in float16")
    assert not (tmp_path / "out").exists()


def test_unknown_task_is_an_argument_error():
    proc = run_train("--task", "poems")
    assert proc.returncode == 2 and error_line(proc) == "error: unknown task 'poems'; known tasks: jokes, squad, squad_extractive"


@pytest.mark.parametrize("argv, message", [
    (["--task", "jokes", "--max_stpes", "3"], "error: --max_stpes: unknown flag; did you mean --max_steps?"),
    (["--task", "jokes", "--learnig_rate", "0.1"], "error: --learnig_rate: unknown flag; did you mean --learning_rate?"),
    (["--task", "jokes", "--max_step", "3"], "error: --max_step: unknown flag; did you mean --max_steps?"),
])
def test_misspelled_and_prefixed_flags_are_refused_naming_the_closest(argv, message):
    with pytest.raises(PeftT5Error) as error:
        parse_train_args(argv)
    assert f"error: {error.value}".startswith(message)


def test_config_file_then_flags_override_it_and_unknown_keys_are_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: jokes\nmodel: tiny\nmax_steps: 20\nlearning_rate: 3e-4\n")
    model, data, lora, training = parse_train_args([str(config), "--max_steps", "5", "--lora_r", "4"])
    assert (data.task, model.model, training.max_steps, training.learning_rate, lora.lora_r) == ("jokes", "tiny", 5, 3e-4, 4)
    config.write_text("task: jokes\nmax_stpes: 20\n")
    with pytest.raises(PeftT5Error, match=r"run.yaml: unknown key 'max_stpes'; did you mean max_steps\?"):
        parse_train_args([str(config)])
    config.write_text("task: jokes\nlearning_rate: fast\n")
    with pytest.raises(PeftT5Error, match=r"run.yaml: learning_rate: 'fast' is not valid"):
        parse_train_args([str(config)])
    (tmp_path / "run.json").write_text('{"task": "jokes", "max_steps": 2')
    with pytest.raises(PeftT5Error, match=r"run.json: not valid JSON"):
        parse_train_args([str(tmp_path / "run.json")])


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
    (["--max_steps", "0"], "--max_steps 0: must be at least 1 (or -1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(PeftT5Error, match=message.replace("(", r"\(")):
        parse_train_args(["--task", "jokes", "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused_in_one_line(tmp_path):
    from test_serve import make_adapter

    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftT5Error, match=r"--output_dir .*/file: is a file; pass a folder path"):
        main_raises(["train", "--task", "jokes", "--model", "tiny", "--output_dir", str(tmp_path / "file")])
    with pytest.raises(PeftT5Error, match=r"--output_dir .*/file/merged: lies under .*/file, a file"):
        main_raises(["merge", "--adapter", make_adapter(tmp_path / "jokes", "jokes", 0),
                     "--output_dir", str(tmp_path / "file" / "merged")])


def main_raises(argv):
    from peft_t5.cli import command

    command(argv[0])(argv[1:])


def test_help_lists_each_command_with_what_it_does_and_exits_0(capsys):
    from peft_t5.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS) and "serve adapters over HTTP" in out
    assert main([]) == 2 and "train a LoRA/QLoRA adapter" in capsys.readouterr().err


def test_evaluate_refuses_an_adapter_of_another_task(tmp_path):
    from test_serve import make_adapter

    adapter = make_adapter(tmp_path / "jokes", "jokes", 0)
    with pytest.raises(PeftT5Error, match="was trained for task 'jokes', not 'squad'; pass --task jokes"):
        main_raises(["evaluate", "--task", "squad", "--adapter", adapter, "--predictions", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_compare_says_when_nothing_was_rated(tmp_path):
    from peft_t5.compare import write_rating_sheet

    sheet = tmp_path / "sheet.csv"
    write_rating_sheet([{"question": "Q?", "reference": "", "base": "a", "jokes": "b"}], ["base", "jokes"], sheet)
    with pytest.raises(PeftT5Error, match="sheet.csv: nothing was rated yet"):
        main_raises(["compare", "--ratings", str(sheet)])


def test_saved_adapters_get_the_users_permissions_and_interrupted_saves_are_cleaned(tmp_path):
    import os

    from test_serve import make_adapter

    stale = tmp_path / ".jokes.saving-999999999-abc"  # a save whose process is gone
    stale.mkdir()
    live = tmp_path / f".jokes.saving-{os.getpid()}-xyz"  # this process's own: in progress, kept
    live.mkdir()
    old = os.umask(0o022)
    try:
        adapter = make_adapter(tmp_path / "jokes", "jokes", 0)
    finally:
        os.umask(old)
    assert oct(os.stat(adapter).st_mode & 0o777) == "0o755"
    assert oct(os.stat(f"{adapter}/adapter_model.safetensors").st_mode & 0o777) == "0o644"
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_a_log_file_gets_plain_lines_not_progress_bar_redraws(tmp_path):
    proc = run_train("--task", "jokes", "--model", "tiny", "--output_dir", str(tmp_path / "a"), "--max_steps", "4",
                     "--logging_steps", "2", "--report_to", "none", "--sample_generations", "0",
                     "--generation_eval_samples", "2", "--max_eval_samples", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "\r" not in log and "\x1b[A" not in log and "'epoch':" not in log  # no bars, no dicts of logs
    steps = [line for line in log.splitlines() if line.startswith("step ")]  # one plain line per logging step
    assert [line.split(" · ")[0] for line in steps] == ["step 2/4 (50%)", "step 4/4 (100%)"], steps
    assert all(re.fullmatch(r"step \d/4 \(\d+%\) · [\d.]+ s/step · ~\d+ (s|min) left · loss [\d.]+ · lr 0.001 · "
                            r"[\d,]+ tokens/s", line) for line in steps), steps
    assert sum(line.startswith("evaluation at step ") and "eval_loss " in line for line in log.splitlines()) >= 2


def test_bf16_on_a_cpu_without_fast_bf16_warns_once(monkeypatch, caplog):
    import peft_t5.modeling
    from peft_t5.tasks import get_task
    from peft_t5.train_settings import resolve_defaults

    monkeypatch.setattr(peft_t5.modeling, "bf16_supported", lambda: False)
    model, data, lora, training = parse_train_args(["--task", "jokes", "--model", "tiny", "--bf16", "--use_cpu"])
    with caplog.at_level("WARNING", logger="peft_t5"):
        resolve_defaults(get_task("jokes"), model, data, training)
    assert [r.message for r in caplog.records if "--bf16 on this CPU" in r.message] == [
        "--bf16 on this CPU (no AVX512-BF16 or AMX units) runs several times slower than float32; leave --bf16 off here"]


def test_model_card_says_how_to_load_this_adapter_and_lists_only_task_metrics():
    from peft_t5.cards import model_card

    meta = {"task": "jokes", "base_model": "tiny", "qlora": False, "template": "{question}",
            "method": "lora", "settings": {"lora_r": 16, "lora_alpha": 32, "target_modules": ["q", "v"]},
            "metrics": {"eval_loss": 2.5, "eval_rougeL": 10.0, "eval_runtime": 3.2, "eval_samples_per_second": 9.0,
                        "epoch": 1.0}}
    card = model_card(meta, "adapters/jokes")
    assert "base = tiny_model()" in card and 'from_pretrained("tiny")' not in card and "github.com/" not in card
    assert 'PeftModel.from_pretrained(base, "adapters/jokes")' in card
    assert "A lora adapter (lora_r=16, lora_alpha=32, target_modules=['q', 'v'])" in card
    assert "| eval_loss | 2.5 |" in card and "| eval_rougeL | 10 |" in card
    assert "runtime" not in card and "per_second" not in card and "| epoch" not in card
    card = model_card(dict(meta, base_model="models/my-flan-t5"), "adapters/jokes")  # a recorded base: a folder
    assert 'base = AutoModelForSeq2SeqLM.from_pretrained("models/my-flan-t5")' in card


def test_printed_samples_skip_what_the_jokes_word_filter_flags():
    from peft_t5.tasks import get_task
    from peft_t5.training import printable_records, shown

    task = get_task("jokes")
    records = [{"question": "Why did my wife leave?", "answer": "x"}, {"question": "Why is the sky blue?", "answer": "y"}]
    assert printable_records(task, records) == records[1:]
    assert shown(task, "a crude joke about your mom") == "(hidden: the word filter flags it)"
    assert shown(task, "") == "(empty output)" and shown(task, "Rayleigh.") == "Rayleigh."
    assert printable_records(get_task("squad"), [{"question": "Who killed him?", "context": "c", "answers": ["x"],
                                                  "answer_starts": [0]}])  # squad prints everything


def test_train_help_starts_with_the_toolkits_own_options(capsys):
    from peft_t5.commands.train import train_main as train

    with pytest.raises(SystemExit) as exit_:
        train(["--help"])  # the whole path: the pre-checks before the parse take --help too
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: peft-t5 train [CONFIG.yaml|json] --task")
    head = out[:out.index("training (every Seq2SeqTrainingArguments flag)")]
    assert all(f"--{flag}" in head for flag in ("model", "qlora", "task", "data", "lora_r", "target_modules"))
    assert "--learning_rate" not in head


@pytest.mark.slow
def test_a_typo_in_the_task_data_or_output_is_reported_before_the_heavy_imports(tmp_path):
    (tmp_path / "file").write_text("x")
    code = ("import sys; from peft_t5.cli import main; rc = main(['train', *sys.argv[1:]]); "
            "assert 'transformers' not in sys.modules, 'imported transformers first'; sys.exit(rc)")
    (tmp_path / "wrong.csv").write_text("a,b\n1,2\n")
    (tmp_path / "existing").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "existing" / name).write_text("{}")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    jokes = ["--task", "jokes", "--model", "tiny"]
    for args, message in [(["--task", "jokez"], "unknown task 'jokez'; known tasks: jokes, squad"),
                          (["--task", "jokes", "--data", "missing.csv"], "missing.csv: no such file; pass --data"),
                          (["--task", "jokes", f"--output_dir={tmp_path / 'file'}"], "is a file; pass a folder path"),
                          ([*jokes, "--lora_rank", "8"], "--lora_rank: unknown flag; did you mean --lora_r?"),
                          ([*jokes, "--lerning_rate", "3"], "--lerning_rate: unknown flag; did you mean --learning_rate?"),
                          ([*jokes, "--lora_r", "0"], "--lora_r 0: the rank must be at least 1"),
                          ([*jokes, "--data", str(tmp_path / "wrong.csv")],
                           "wrong.csv: record 0 has columns ['a', 'b']; expected Question/Answer or title/body"),
                          (["--task", "squad", "--model", "tiny", "--data", "peft_t5/data/jokes_sample.csv"],
                           "jokes_sample.csv: a CSV file; the squad task reads SQuAD v2.0 JSON"),
                          ([*jokes, "--output_dir", str(tmp_path / "existing")],
                           "already holds an adapter; pass --overwrite_output_dir to replace it"),
                          ([*jokes, "--output_dir", str(tmp_path / "foreign")],
                           "holds files peft-t5 did not write (notes.txt)")]:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and message in error_line(proc), proc.stderr[-1500:]


REFUSALS_BEFORE_TORCH = r'''
import json, sys
from peft_t5.cli import main
for args in json.loads(sys.argv[1]):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    print("RESULT", rc, "torch" in sys.modules, flush=True)
    sys.stderr.write("\n")
'''


def test_flag_level_mistakes_and_help_are_answered_before_torch_is_imported(tmp_path):
    """Each refusal is one line, printed with torch not imported (each took 5-11 s before), and train --help too."""
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("Question,Answer\n")
    (tmp_path / "cfg.yaml").write_text("task: jokes\nmodel: tiny\nlearnig_rate: 0.01\n")
    jokes = ["train", "--task", "jokes", "--model", "tiny", "--output_dir", str(tmp_path / "out")]
    cases = [
        ([*jokes, "--eval_steps", "-3"], "--eval_steps -3: must be more than 0"),
        ([*jokes, "--eval_steps", "0"], "--eval_steps 0: must be more than 0"),
        ([*jokes, "--max_steps", "-5"], "--max_steps -5: must be at least 1 (or -1, the default"),
        ([*jokes, "--layers", "decoder:9"], "--layers decoder:9: this model has no decoder block 9 (its encoder has "
                                            "blocks 0-1, its decoder 0-1)"),
        ([*jokes, "--layers", "decoder:5-2"], "--layers decoder:5-2: the range 5-2 in 'decoder:5-2' is reversed; "
                                              "write decoder:2-5"),
        ([*jokes, "--data", str(tmp_path / "empty.csv")], "empty.csv: the file has no rows (a header at most)"),
        ([*jokes, "--data", str(tmp_path / "header.csv")], "header.csv: the file has no rows (a header at most)"),
        (["train", "--model", "tiny"], "--task is required: jokes, squad or squad_extractive"),
        (["train", "--task", "jokes", "--output_dir", "/proc/x"], "--output_dir /proc/x: cannot write in /proc"),
        (["train", str(tmp_path / "cfg.yaml")], f"{tmp_path / 'cfg.yaml'}: unknown key 'learnig_rate'; did you mean "
                                               "learning_rate?"),
        ([*jokes, "--method", "fulll"], "--method fulll: unknown; did you mean full?; the methods that train: lora, "
                                        "dora, ia3, adalora, prompt_tuning, vera, full"),
        (["evaluate", "--task", "jokes", "--predictions", "p.json", "--limt", "3"],
         "--limt: unknown flag; did you mean --limit?"),
        (["sweep", str(tmp_path / "cfg.yaml"), "--worker", "2"], "--worker: unknown flag; did you mean --workers?"),
        (["merge", "--adapter", "a", "--output", "m"], "--output: renamed --output_dir (one name for one thing in "
                                                       "every command); pass --output_dir"),
        (["generate", "--adapter", "j=a", "--task", "j", "Why?"], "--task: renamed --adapter_name"),
    ]
    proc = subprocess.run([sys.executable, "-c", REFUSALS_BEFORE_TORCH, json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    results = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    errors = [block.strip() for block in proc.stderr.split("\n\n")][:len(cases)]
    assert results == [["2", "False"]] * len(cases), proc.stdout + proc.stderr
    for (args, message), error in zip(cases, errors):
        lines = [line for line in error.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, error)

    proc = subprocess.run([sys.executable, "-c", REFUSALS_BEFORE_TORCH, json.dumps([["train", "--help"],
                                                                                   ["--version"]])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")] == \
        [["0", "False"], ["0", "False"]], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: peft-t5 train") and "--learning_rate LEARNING_RATE" in proc.stdout
    assert "\npeft-t5 0.1.0\n" in proc.stdout


def test_the_hyphenated_flags_help_shows_are_taken_and_mean_the_same():
    from peft_t5.train_settings import parse_command_line

    flags = ["--task", "jokes", "--model", "tiny", "--learning-rate", "0.01", "--lora-r", "8", "--max-steps", "3"]
    hyphens = parse_command_line(flags)
    underscores = parse_command_line(["--" + f[2:].replace("-", "_") if f.startswith("--") else f for f in flags])
    assert list(hyphens) == list(underscores) and hyphens.training.learning_rate == 0.01 and hyphens.method.lora_r == 8


def test_after_a_tiny_run_on_the_users_data_the_note_names_that_data_not_the_demo_sample():
    from peft_t5.tasks import get_task
    from peft_t5.training import real_data

    jokes = get_task("jokes")
    assert real_data(jokes, "my/jokes.csv") == "--model google/flan-t5-large --data my/jokes.csv"
    assert "the bundled sample is a demo" in real_data(jokes, jokes.sample)
