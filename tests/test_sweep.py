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
    assert "trial 1 was interrupted when the sweep stopped: it runs again as a new trial" in second.stdout

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
