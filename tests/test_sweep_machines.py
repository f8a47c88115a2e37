"""Sweeps across machines: several `peft-t5 sweep` processes, each in its own process group and folder, share one study
on a real PostgreSQL server (started here, on a loopback port) or in Optuna's journal file. Together they run exactly
the study's trials, none twice; one killed with -9 mid-trial leaves its trial to be failed as interrupted and run again
once by another; any process makes the report from the storage alone; an unreachable server or a wrong password is one
line naming the host, with nothing written."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from test_sweep import TRAIN, until, writers_of

PASSWORD = "peft-t5-test"


def postgres_tool(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on a free loopback port (initdb and pg_ctl in a temporary folder; as the
    postgres user where the tests run as root, which PostgreSQL refuses); its URL, with a password."""
    initdb, pg_ctl = postgres_tool("initdb"), postgres_tool("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            raise RuntimeError("CI needs PostgreSQL (Debian's postgresql; .ci/run installs it)")
        pytest.skip("no PostgreSQL here (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="peft-t5-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "password").write_text(PASSWORD + "\n")
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(root / "password", "postgres")
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-U", "peft", "--auth-host=scram-sha-256",
                    "--auth-local=trust", f"--pwfile={root / 'password'}"], check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -c listen_addresses=127.0.0.1 -k {root}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, postgres_tool("createdb") or "createdb", "-h", str(root), "-p", str(port), "-U",
                        "peft", "sweeps"], check=True, capture_output=True)
        yield f"postgresql://peft:{PASSWORD}@127.0.0.1:{port}/sweeps", port
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def start_sweep(config: Path, storage: str, folder: Path) -> subprocess.Popen:
    """A sweep as on a machine of its own: its own process group (a kill takes it, its forkserver and its trial)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "peft_t5", "sweep", str(config), "--storage", storage,
                             "--study_name", "shared", "--output_dir", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def read_until(proc: subprocess.Popen, prefix: str, lines: list[str]) -> str:
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the sweep ended before printing {prefix!r}: {''.join(lines)[-3000:]}")


def trial_of(proc: subprocess.Popen, folder: Path, lines: list[str]) -> tuple[int, int]:
    """The number and process of the first trial the sweep starts, once it trains (it has its log open)."""
    while " started: " not in (line := read_until(proc, "trial ", lines)):  # not "trial N was interrupted ..."
        pass
    number = int(line.split()[1])
    return number, until(lambda: writers_of(folder / "logs" / f"{number:03d}.log"))[0]


def storage_url(kind: str, postgres_url: str | None, tmp_path: Path) -> str:
    return postgres_url if kind == "postgresql" else f"journal:{tmp_path / 'journal.log'}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_three_sweeps_share_one_study_and_one_killed_mid_trial_is_run_again_by_another(kind, tmp_path, request):
    url = storage_url(kind, request.getfixturevalue("postgres")[0] if kind == "postgresql" else None, tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"train": TRAIN, "trials": 6, "pruner": "none", "sampler": "random",
                                      "space": {"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                                                "lora_r": {"low": 4, "high": 16, "step": 4}}}))
    folders = [tmp_path / name for name in ("a", "b", "c")]
    out = {name: [] for name in "abc"}
    # each machine's trial is held (SIGSTOP) until the next machine has joined, so that every sweep gets a trial
    # whatever the machine's speed: none can run the whole study before the others start
    a = start_sweep(config, url, folders[0])
    _, held = trial_of(a, folders[0], out["a"])
    os.kill(held, signal.SIGSTOP)
    b = start_sweep(config, url, folders[1])
    number, killed = trial_of(b, folders[1], out["b"])
    os.kill(killed, signal.SIGSTOP)  # mid-trial, and it cannot finish before the kill
    os.killpg(b.pid, signal.SIGKILL)
    b.wait(timeout=300)
    c = start_sweep(config, url, folders[2])
    trial_of(c, folders[2], out["c"])  # c takes the killed trial's retry: a's sweep waits on its held trial
    os.kill(held, signal.SIGCONT)
    finished = {}
    for name, proc in (("a", a), ("c", c)):
        rest, _ = proc.communicate(timeout=600)
        out[name].append(rest)
        finished[name] = proc.returncode
    assert finished == {"a": 0, "c": 0}, out

    study = optuna.load_study(study_name="shared", storage=__import__("peft_t5.sweeping").sweeping.storage_for(url))
    trials = study.get_trials()
    reasons = {t.number: t.user_attrs.get("reason", "") for t in trials}
    interrupted = [t for t in trials if reasons[t.number].startswith("interrupted")]
    surplus = [t for t in trials if reasons[t.number].startswith("not run")]
    counted = [t for t in trials if t not in interrupted and t not in surplus]
    assert [t.number for t in interrupted] == [number]  # the killed trial, failed as interrupted once
    assert len(counted) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    retry = [t for t in counted if t.system_attrs.get("fixed_params") and t.user_attrs.get("retry_of") == number]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params  # run again once, with the same flags
    logs = sorted(p.name for folder in folders for p in (folder / "logs").glob("*.log"))
    assert logs == sorted(f"{t.number:03d}.log" for t in [*counted, *interrupted])  # none ran twice
    for t in counted:  # each trial's folder is recorded where its sweep ran it
        assert t.user_attrs["folder"].split(":", 1)[1].startswith(str(tmp_path)), t.user_attrs
    assert all(any("of 6 done" in line for line in out[name]) for name in "ac"), out  # the study's totals

    report = subprocess.run([sys.executable, "-m", "peft_t5", "sweep", "report", "--storage", url, "--study_name",
                             "shared", "--output_dir", str(tmp_path / "report")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "report" / "trials.md").read_text()
    assert table.count("| COMPLETE |") == 6 and "(best)" in table
    assert (tmp_path / "report" / "plots" / "metric_vs_trainable_parameters.png").is_file()
    retrain = report.stdout.split("retrain it: ")[1]
    assert retrain.startswith("python scripts/train_lora.py ") and " --task jokes " in retrain, report.stdout


@pytest.mark.slow
def test_the_report_of_a_study_still_running_lists_its_running_trials(tmp_path):
    url = f"journal:{tmp_path / 'journal.log'}"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"train": {**TRAIN, "max_steps": 100000}, "trials": 1, "pruner": "none",
                                      "space": {"learning_rate": [1.0e-3]}}))
    sweep = start_sweep(config, url, tmp_path / "run")
    try:
        read_until(sweep, "trial 0 started", [])
        report = subprocess.run([sys.executable, "-m", "peft_t5", "sweep", "report", "--storage", url,
                                 "--study_name", "shared", "--output_dir", str(tmp_path / "report")],
                                capture_output=True, text=True)
        assert report.returncode == 0, report.stderr[-2000:]
        assert "| 0 | RUNNING |" in (tmp_path / "report" / "trials.md").read_text()
        assert "study 'shared': 1 running of 1 trials" in report.stdout
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()


@pytest.mark.parametrize("which", ["unreachable", "password"])
def test_a_database_that_cannot_be_reached_or_refuses_the_password_is_one_line(which, tmp_path, capsys, request):
    from test_reliability import run_cli_alone

    from peft_t5.cli import command

    if which == "unreachable":
        url = f"postgresql://peft:{PASSWORD}@127.0.0.1:{free_port()}/sweeps"  # nothing listens there
        said = "connection to server at \"127.0.0.1\""
    else:
        _, port = request.getfixturevalue("postgres")
        url = f"postgresql://peft:wrong@127.0.0.1:{port}/sweeps"
        said = "password authentication failed for user \"peft\""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"train": TRAIN, "trials": 1, "space": {"learning_rate": [1.0e-3]}}))
    status, line = run_cli_alone(command("sweep"), [str(config), "--storage", url, "--output_dir",
                                                    str(tmp_path / "run")], capsys)
    assert status == 2 and line.startswith("error: --storage postgresql://peft:***@127.0.0.1:") and said in line, line
    assert PASSWORD not in line and "wrong" not in line.split("(")[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_a_shared_study_name_reused_with_another_sweep_file_is_refused_naming_the_original(kind, tmp_path, capsys,
                                                                                           monkeypatch, request):
    from test_reliability import run_cli

    from peft_t5.cli import command
    from peft_t5.sweeping import Sweep

    def failing(self, trial, params):  # no training needed: the study only has to exist
        trial.set_user_attr("reason", "the loss diverged")
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    monkeypatch.setattr(Sweep, "run_trial", failing)
    url = storage_url(kind, request.getfixturevalue("postgres")[0] if kind == "postgresql" else None, tmp_path)
    study = f"reused-{kind}"
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [1.0e-3]}, "trials": 1}))
    second.write_text(yaml.safe_dump({"train": TRAIN, "space": {"learning_rate": [5.0e-3]}, "trials": 1}))
    shared = ["--storage", url, "--study_name", study]
    run_cli(command("sweep"), [str(first), *shared, "--output_dir", str(tmp_path / "a")], capsys)
    status, err = run_cli(command("sweep"), [str(second), *shared, "--output_dir", str(tmp_path / "b")], capsys)
    assert status == 2 and f"study '{study}' in " in err and PASSWORD not in err
    assert f"was started from {first}, whose settings differ from {second}'s; pass {first} again" in err
    assert not (tmp_path / "b").exists()  # refused with nothing written


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_sweeps_joining_a_grid_study_as_it_is_created_enqueue_its_points_once(kind, tmp_path, request):
    """The creator of the study alone records its config and enqueues the grid; the others wait for it (before, two
    sweeps starting together each enqueued the grid, so points ran twice and others never)."""
    import threading

    from peft_t5.sweeping import Sweep, grid, read_sweep_config

    url = storage_url(kind, request.getfixturevalue("postgres")[0] if kind == "postgresql" else None, tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "sampler": "grid", "trials": 6,
                                    "space": {"method": ["lora", "ia3"], "learning_rate": [1.0e-3, 1.0e-2, 1.0e-1]}}))
    config = read_sweep_config(str(path))
    barrier, errors = threading.Barrier(4), []

    def join(i: int) -> None:
        sweep = Sweep(config, tmp_path / f"m{i}", storage=url, study_name=f"grid-{kind}")
        barrier.wait()
        try:
            sweep.open()
        except Exception as e:  # noqa: BLE001 - gathered for the assertion below
            errors.append(e)
    threads = [threading.Thread(target=join, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    study = optuna.load_study(study_name=f"grid-{kind}", storage=__import__("peft_t5.sweeping").sweeping.storage_for(url))
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials()]
    expected = grid(config)
    assert len(waiting) == len(expected) == 6 and all(p in waiting for p in expected)
