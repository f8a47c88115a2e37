"""`peft-t5 sweep`: a study over training flags. It writes its table and plots; killed with -9 mid-trial and started
again it keeps the finished trials and re-runs the interrupted one; two workers share one study without running a
trial twice; a trial that diverges fails with its reason and the sweep goes on; bad sweep files are refused in one
line naming the key."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

TRAIN = {"task": "jokes", "model": "tiny", "max_steps": 4, "max_source_length": 64, "max_eval_samples": 8,
         "disable_tqdm": True}


def sweep(folder, config: dict, *flags, wait=True):
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "peft_t5", "sweep", str(path), "--output_dir", str(folder / "run"), *flags]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def writers_of(path) -> list[int]:
    """The processes that have `path` open."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
        except OSError:  # a process that ended meanwhile, or not ours to read
            continue
    return found


def until(condition, timeout: float = 300.0):
    """condition()'s first true value, looked for every 0.1 s (a bound on a hang, not a pace)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "it never came about"
        time.sleep(0.1)
    return value


def trials_csv(folder) -> list[dict]:
    with open(folder / "run" / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_keeps_its_finished_trials_and_ends_with_all_of_them(tmp_path):
    config = {"train": TRAIN, "trials": 4, "pruner": "none",  # all four complete (pruning: the next test)
              "space": {"method": ["lora", "ia3"], "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                        "lora_r": {"low": 4, "high": 16, "step": 4}}}
    first = sweep(tmp_path, config, wait=False)
    lines = []
    log = tmp_path / "run" / "logs" / "001.log"
    for line in first.stdout:
        lines.append(line)
        if line.startswith("trial 1 started"):
            break
    trial = until(lambda: writers_of(log))[0]  # the second trial's process has begun: it opened its log
    os.kill(trial, signal.SIGSTOP)  # it cannot finish, however fast the machine, while its sweep is killed
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=300)
    os.kill(trial, signal.SIGCONT)
    assert any(line.startswith("trial 0 COMPLETE") for line in lines), lines
    until(lambda: not writers_of(log))  # the trial's process dies with the sweep (else it trains on: a hang)
    assert not psutil.pid_exists(trial) or psutil.Process(trial).status() == psutil.STATUS_ZOMBIE
    assert log.exists() and not (tmp_path / "run" / "logs" / "001.result.json").exists()  # killed mid-trial

    second = sweep(tmp_path, config)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = trials_csv(tmp_path)
    states = [r["state"] for r in rows]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1, rows
    interrupted = next(r for r in rows if r["state"] == "FAIL")
    assert interrupted["reason"].startswith("interrupted") and interrupted["trial"] == "1"
    retried = next(r for r in rows if r["trial"] == "2")  # the interrupted trial's flags, run again
    assert [retried[k] for k in ("method", "learning_rate", "lora_r")] == \
        [interrupted[k] for k in ("method", "learning_rate", "lora_r")]
    assert rows[0]["eval_loss"] and float(rows[0]["trainable_parameters"]) > 0 and float(rows[0]["wall_s"]) > 0
    assert all((r["lora_r"] == "") == (r["method"] == "ia3") for r in rows)  # ia3 takes no rank
    assert "trial 1 was interrupted when its sweep stopped: it runs again as a new trial" in second.stdout

    run = tmp_path / "run"
    table = (run / "trials.md").read_text()
    assert table.startswith("| trial | state | method | learning_rate | lora_r | eval_loss | trainable_parameters")
    for plot in ("metric_vs_trainable_parameters", "metric_vs_wall_time", "param_importances"):
        assert (run / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    best = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["eval_loss"]))
    assert f"| {best['trial']} (best) |" in table
    assert json.loads((run / "best" / "peft_t5.json").read_text())["method"] == best["method"]
    assert sorted(p.name for p in (run / "trials").iterdir()) == [f"{int(best['trial']):03d}"]  # the rest removed
    last = second.stdout.strip().splitlines()[-1]
    assert last.startswith(f"best: trial {best['trial']}, eval_loss ") and \
        "retrain it: python scripts/train_lora.py --task jokes --model tiny --max_steps 4" in last
    assert f"--method {best['method']}" in last


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_diverging_trial_fails_with_its_reason(tmp_path):
    config = {"train": TRAIN, "sampler": "grid", "pruner": "none",
              "space": {"learning_rate": [1.0e-3, 3.0e-3, 1.0e30], "lora_r": [4]}}
    done = sweep(tmp_path, config, "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = trials_csv(tmp_path)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"]  # the grid's 3 points, each once
    assert sorted(float(r["learning_rate"]) for r in rows) == [1.0e-3, 3.0e-3, 1.0e30]
    assert len(list((tmp_path / "run" / "logs").glob("*.log"))) == 3  # no trial ran twice
    diverged = next(r for r in rows if float(r["learning_rate"]) == 1.0e30)
    assert diverged["state"] == "FAIL" and diverged["reason"].startswith("the loss diverged"), diverged
    assert [r["state"] for r in rows].count("COMPLETE") == 2
    study = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert study["workers"] == 2 and study["trials_s"] <= study["wall_s"]  # that they run at once: the next test


def test_two_workers_run_two_trials_at_once(tmp_path, monkeypatch):
    """Each of the two trials waits for the other to be running too: workers that took turns would never meet."""
    import threading

    from peft_t5.sweeping import Sweep, read_sweep_config

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "sampler": "grid", "space": {"learning_rate": [1.0e-3, 3.0e-3]}}))
    both_running = threading.Barrier(2, timeout=300)
    ran = []

    def run_trial(self, trial, params):
        both_running.wait()
        ran.append(params["learning_rate"])
        self.study.tell(trial, 1.0)
    monkeypatch.setattr(Sweep, "run_trial", run_trial)
    Sweep(read_sweep_config(str(path)), str(tmp_path / "run"), workers=2).run()
    assert sorted(ran) == [1.0e-3, 3.0e-3]


@pytest.mark.parametrize("change, message", [
    ({"spaces": {}}, "unknown key 'spaces'; did you mean space?"),
    ({"space": {"learning_rat": [1]}}, "space: unknown flag 'learning_rat'; did you mean learning_rate?"),
    ({"space": {"learning_rate": {"low": 1.0, "high": 0.1}}}, "space: learning_rate: low 1.0 is not below high 0.1"),
    ({"space": {"learning_rate": {"low": "1e-4", "high": 0.1}}}, "low, high and step must be numbers"),
    ({"space": {"method": ["lora", "prefix"]}}, "--method prefix: unknown"),
    ({"sampler": "grid", "space": {"learning_rate": {"low": 0.1, "high": 0.2}}}, "a grid needs a list of values"),
    ({"train": {"task": "jokes", "output_dir": "x"}}, "train: output_dir: the sweep gives each trial a folder"),
    ({"space": {"max_steps": [2, 4]}}, "space: max_steps is also fixed in train"),
    ({"train": {"task": "jokes", "max_stepz": 4}}, "train: unknown flag 'max_stepz'; did you mean max_steps?"),
])
def test_a_bad_sweep_file_is_refused_in_one_line_naming_the_key(tmp_path, capsys, change, message):
    from test_reliability import run_cli

    from peft_t5.cli import command

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [1.0e-3]}, "trials": 1, **change}))
    status, err = run_cli(command("sweep"), [str(path), "--output_dir", str(tmp_path / "run")], capsys)
    assert status == 2 and err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("storage, said", [
    ("foo", "--storage foo: cannot open the study there (ArgumentError"),
    ("sqlite:////no/such/folder/study.db", "--storage sqlite:////no/such/folder/study.db: cannot open the study there"),
])
def test_a_storage_that_cannot_be_opened_is_one_line_and_nothing_is_written(tmp_path, capsys, storage, said):
    from test_reliability import run_cli_alone

    from peft_t5.cli import command

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [1.0e-3]}, "trials": 1}))
    status, line = run_cli_alone(command("sweep"), [str(path), "--output_dir", str(tmp_path / "run"), "--storage",
                                                    storage], capsys)
    assert status == 2 and line.startswith(f"error: {said}"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"train": {**TRAIN, "data": "missing.csv"}}, "train: missing.csv: no such file"),
    ({"train": {**TRAIN, "max_steps": -5}}, "train: --max_steps -5: must be at least 1"),
    ({"space": {"lora_r": [0, 4]}}, "space: lora_r: --lora_r 0: the rank must be at least 1 (with method lora)"),
    ({"space": {"method": ["lora", "ia3"], "lora_dropout": {"low": 0.0, "high": 1.5}}},
     "space: lora_dropout: --lora_dropout 1.5:"),
])
def test_train_flags_and_search_ranges_are_checked_once_before_any_trial(tmp_path, capsys, change, message):
    from test_reliability import run_cli

    from peft_t5.cli import command

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [1.0e-3]}, "trials": 2, **change}))
    status, err = run_cli(command("sweep"), [str(path), "--output_dir", str(tmp_path / "run")], capsys)
    assert status == 2 and err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_sweep_where_no_trial_completes_fails_and_a_folder_names_its_original_file(tmp_path, capsys, monkeypatch):
    from test_reliability import run_cli

    from peft_t5.cli import command
    from peft_t5.sweeping import Sweep

    def failing(self, trial, params):  # every trial fails as a diverged run does
        trial.set_user_attr("reason", "the loss diverged")
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    monkeypatch.setattr(Sweep, "run_trial", failing)
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [1.0e-3, 2.0e-3]}, "trials": 2}))
    second.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [5.0e-3]}, "trials": 2}))
    run = ["--output_dir", str(tmp_path / "run")]
    status, err = run_cli(command("sweep"), [str(first), *run], capsys)
    assert status == 2 and err == (f"error: no trial completed, so there is nothing to retrain: {tmp_path / 'run'}/"
                                   "trials.md gives each trial's reason")
    assert "the loss diverged" in (tmp_path / "run" / "trials.md").read_text()
    status, err = run_cli(command("sweep"), [str(second), *run], capsys)
    assert status == 2 and f"was started from {first}, whose settings differ from {second}'s; pass {first} again" in err


def test_the_last_evaluation_is_the_result_and_never_pruned(tmp_path):
    """A pruner that prunes every report: the trial is stopped at an evaluation before its last step, never at it."""
    from transformers import TrainerControl, TrainerState

    from peft_t5.sweeping import reporter

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    spec = {"config": {"train": TRAIN, "space": {}, "trials": 1, "pruner": "none"}, "study": "s",
            "storage": storage, "trial_id": trial._trial_id, "objective": "eval_loss"}
    callback = reporter(spec)
    callback.trial.study.pruner = Always()
    callback.training = True
    state = TrainerState(max_steps=20)
    for step, pruned in ((10, True), (20, False)):
        state.global_step = step
        if pruned:
            with pytest.raises(optuna.TrialPruned, match="pruned at step 10"):
                callback.on_log(None, state, TrainerControl(), logs={"eval_loss": 1.0})
        else:
            callback.on_log(None, state, TrainerControl(), logs={"eval_loss": 1.0})  # the last step: reported only
    assert study.trials[0].intermediate_values == {10: 1.0, 20: 1.0}



def test_the_plots_name_the_objective_and_draw_every_method_and_every_trial(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_t5.sweep_report import metric_against, plot_sweep
    from peft_t5.sweeping import SweepConfig

    study = optuna.create_study()
    for i, (method, state) in enumerate([("lora", "COMPLETE"), ("lora", "COMPLETE"), ("ia3", "COMPLETE"),
                                         ("ia3", "PRUNED"), ("lora", "FAIL"), ("ia3", "COMPLETE")]):
        study.enqueue_trial({"method": method})
        trial = study.ask({"method": optuna.distributions.CategoricalDistribution(["lora", "ia3"])})
        trial.set_user_attr("trainable_parameters", 1000 * (i + 1))
        trial.set_user_attr("train_s", 5.0 + i)
        if state == "PRUNED":
            trial.report(3.0, 10)
        study.tell(trial, 2.0 - i / 10 if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
    config = SweepConfig({"task": "jokes"}, {"method": ["lora", "ia3"]}, 6, objective="eval_loss",
                         direction="minimize")
    ax = metric_against(study.get_trials(), config, "trainable_parameters", "trainable parameters", plt)
    assert ax.get_ylabel() == "eval_loss, lower is better" and ax.get_xlabel() == "trainable parameters"
    assert ax.get_title() == "eval_loss against trainable parameters"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["ia3", "ia3, pruned or failed", "lora", "lora, pruned or failed", "Pareto front"]
    drawn = sum(len(collection.get_offsets()) for collection in ax.collections)
    assert drawn == 6  # the pruned and the failed trials too (hollow), not only the 4 completed
    hollow = [c for c in ax.collections if len(c.get_facecolors()) == 0 or c.get_facecolors()[0][3] == 0]
    assert sum(len(c.get_offsets()) for c in hollow) == 2
    plt.close(ax.figure)
    assert plot_sweep(study, config, tmp_path) == ["metric_vs_trainable_parameters.png", "metric_vs_wall_time.png",
                                                   "param_importances.png"]
