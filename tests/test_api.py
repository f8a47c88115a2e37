"""The library from Python, with the command line's names: peft_t5.train / evaluate / merge / export / sweep and
AdapterBank; a mistake is the CLI's one-line PeftT5Error (never SystemExit), Ctrl-C a KeyboardInterrupt that names
the checkpoint kept; and the house's rule that no library module imports a command."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import peft_t5
from peft_t5.errors import Interrupted, PeftT5Error

PACKAGE = Path(peft_t5.__file__).parent
QUICK = dict(model="tiny", max_steps=2, report_to="none", sample_generations=0, max_source_length=64,
             max_eval_samples=4, generation_eval_samples=2, disable_tqdm=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> peft_t5.TrainResult:
    return peft_t5.train(task="jokes", output_dir=str(tmp_path_factory.mktemp("api") / "jokes"), lora_r=4, **QUICK)


def test_import_peft_t5_is_instant_and_loads_the_names_on_first_use():
    code = ("import sys, peft_t5; heavy = [m for m in ('torch', 'transformers', 'optuna') if m in sys.modules]; "
            "print(heavy, sorted(peft_t5.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("[] ['AdapterBank', 'EvaluationResult', 'ExportReport', 'Interrupted', 'MergeReport', "
                           "'PeftT5Error', 'SweepResult', 'TrainResult', 'evaluate', 'export', 'merge', 'sweep', "
                           "'train']")
    assert callable(peft_t5.train) and peft_t5.AdapterBank.__name__ == "AdapterBank"
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        peft_t5.trian


@pytest.mark.slow
def test_train_takes_the_flags_as_keywords_and_returns_what_it_made(trained):
    from safetensors.torch import load_file

    folder = Path(trained.output_dir)
    assert trained.method == "lora" and trained.metrics["eval_loss"] > 0
    weights = load_file(folder / "adapter_model.safetensors")
    assert trained.trainable_parameters == sum(t.numel() for t in weights.values())
    meta = json.loads((folder / "peft_t5.json").read_text())
    assert meta["settings"]["lora_r"] == 4 and meta["training_args"]["max_steps"] == 2
    assert meta["metrics"]["eval_loss"] == trained.metrics["eval_loss"]


def test_a_config_file_with_keywords_over_it_gives_the_flags_settings(tmp_path):
    from peft_t5.train_settings import from_keywords, parse_command_line

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "jokes", "model": "tiny", "learning_rate": "3e-4", "lora_r": 8,
                                      "target_modules": ["q", "k"], "max_steps": 20}))
    by_keywords = from_keywords(str(config), {"max_steps": 5, "target_modules": "all-linear"})
    by_flags = parse_command_line([str(config), "--max_steps", "5", "--target_modules", "all-linear"])
    for got, expected in zip(by_keywords, by_flags):
        assert got == expected
    model, data, method, training = by_keywords
    assert (training.max_steps, training.learning_rate, method.lora_r, method.target_modules) == \
        (5, 3e-4, 8, ["all-linear"])
    assert from_keywords({"task": "jokes", "model": "tiny"}, {"lora_r": 2}).method.lora_r == 2  # a dict as config


@pytest.mark.parametrize("flags, message", [
    (dict(lora_rank=4), "lora_rank: unknown flag; did you mean lora_r?"),
    (dict(method="fulll"), "--method fulll: unknown; did you mean full?; the methods that train: lora, dora, ia3, "
                           "adalora, prompt_tuning, vera, full"),
    (dict(lora_r="x"), "argument --lora_r: invalid int value: 'x'"),
    (dict(learning_rate="abc"), "learning_rate: 'abc' is not valid"),
    (dict(lora_r=0), "--lora_r 0: the rank must be at least 1"),
    (dict(task="jokez"), "unknown task 'jokez'; known tasks: jokes, squad"),
])
def test_every_mistake_is_the_clis_one_line_error_and_never_an_exit(tmp_path, flags, message):
    settings = {"task": "jokes", **QUICK, "output_dir": str(tmp_path / "out"), **flags}
    with pytest.raises(PeftT5Error) as raised:
        peft_t5.train(**settings)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_raises_keyboard_interrupt_naming_the_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    from peft_t5.trainer import TaskTrainer

    step = TaskTrainer.training_step

    def pressed_in_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    out = tmp_path / "jokes"
    settings = dict(task="jokes", output_dir=str(out), **{**QUICK, "max_steps": 4}, save_strategy="steps",
                    save_steps=1, eval_strategy="no", load_best_model_at_end=False, eval_on_start=False)
    monkeypatch.setattr(TaskTrainer, "training_step", pressed_in_step_3)
    with pytest.raises(KeyboardInterrupt) as raised:
        peft_t5.train(**settings)
    assert isinstance(raised.value, Interrupted)
    assert str(raised.value) == (f"interrupted at step 2; {out}/checkpoints/checkpoint-2 is kept; continue with "
                                 "resume=True")
    monkeypatch.undo()
    result = peft_t5.train(**settings, resume=True)
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and Path(result.output_dir, "adapter_model.safetensors").is_file()


def test_evaluate_merge_and_the_bank_from_python(trained, tmp_path):
    evaluated = peft_t5.evaluate(task="jokes", adapter=trained.output_dir, predictions=str(tmp_path / "p.json"),
                                 limit=3, max_new_tokens=4, compare_base=True)
    assert evaluated.model == "tiny" and {"rougeL", "chrf"} <= evaluated.metrics.keys()
    assert evaluated.base_metrics is not None and len(json.loads((tmp_path / "p.json").read_text())) == 3
    assert json.loads((tmp_path / "p.metrics.json").read_text()) == evaluated.metrics
    with pytest.raises(PeftT5Error, match="--num_beams 0: must be from 1 to 16"):
        peft_t5.evaluate(task="jokes", adapter=trained.output_dir, predictions=str(tmp_path / "q.json"), num_beams=0)

    report = peft_t5.merge(trained.output_dir, str(tmp_path / "merged"))
    assert report.max_logit_diff <= report.tolerance and (tmp_path / "merged" / "model.safetensors").is_file()
    with pytest.raises(PeftT5Error, match="already exists and is not empty; pass another --output_dir"):
        peft_t5.merge(trained.output_dir, str(tmp_path / "merged"))

    bank = peft_t5.AdapterBank.load(None, {"jokes": trained.output_dir})  # the base recorded with the adapter
    one = bank.generate("jokes", "Why did the chicken cross the road?", max_new_tokens=6)
    assert one == bank.generate("jokes", ["Why did the chicken cross the road?"], max_new_tokens=6)  # one input


def test_no_library_module_imports_a_command():
    """Every import points down: commands/ parses flags and calls the library, never the other way."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "commands" in path.relative_to(PACKAGE).parts or path.name == "cli.py":
            continue
        depth = len(path.relative_to(PACKAGE).parts) - 1
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level + (node.module or "")) if node.level else node.module or ""
                relative_to_package = node.level and target.lstrip(".").startswith("commands") and \
                    node.level == depth + 1
                if relative_to_package or target.startswith("peft_t5.commands"):
                    offenders.append(f"{path.relative_to(PACKAGE)}: {target}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                              if a.name.startswith("peft_t5.commands")]
    assert offenders == []


def test_every_command_is_thin():
    for path in (PACKAGE / "commands").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 150, path.name


def test_the_final_evaluation_is_the_last_one_logged_not_a_second_run_of_it(tmp_path, monkeypatch):
    from peft_t5.trainer import TaskTrainer

    calls = []
    evaluate = TaskTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)
    monkeypatch.setattr(TaskTrainer, "evaluate", counted)
    result = peft_t5.train(task="jokes", output_dir=str(tmp_path / "run"), **{**QUICK, "max_steps": 4},
                           eval_strategy="steps", eval_steps=2, save_steps=2)
    assert calls == [0, 2, 4]  # at the start and every 2 steps: the step-4 one is the result, not run again
    logged = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    at_4 = [e for e in logged["log_history"] if e.get("step") == 4 and "eval_loss" in e]
    assert result.metrics["eval_loss"] == at_4[0]["eval_loss"]
