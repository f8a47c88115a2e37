"""`peft-t5 sweep`: an Optuna study over `peft-t5 train` flags.

Each trial is the toolkit's own training in a process of its own (one that crashes or runs out of memory fails that
trial alone), and it reports each evaluation to the study so that Optuna's pruner can stop it early. The study lives
in SQLite inside the sweep folder, or in any Optuna storage URL: a sweep killed at any moment starts again where it
was, and workers (threads here, or sweeps on other machines sharing the storage) share one study.

    peft-t5 sweep sweep.yaml --output_dir runs/sweep1 [--workers 2] [--storage URL] [--keep_all]
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shlex
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .adapters import process_alive
from .errors import Interrupted, PeftT5Error
from .methods import METHOD_FLAGS, TRAINABLE, get_method

KEYS = ("train", "space", "trials", "sampler", "objective", "direction", "pruner")
SAMPLERS = ("tpe", "grid", "random")
# a trial evaluates four times (what the pruner reads) and keeps no checkpoints, unless `train` says otherwise
TRIAL_DEFAULTS = {"eval_strategy": "steps", "eval_steps": 0.25, "save_strategy": "no", "load_best_model_at_end": False,
                  "eval_on_start": False, "report_to": "none", "sample_generations": 0}
COLUMNS = ("trial", "state", "value", "trainable_parameters", "peak_memory_mb", "tokens_per_s", "wall_s", "reason")
HOST = socket.gethostname()
INTERRUPTED = "interrupted"  # how a trial whose sweep process died begins its reason
SURPLUS = "not run"  # how a trial asked past the budget (sweeps beside each other) begins its reason
HEARTBEAT_S, GRACE_S = 20, 120  # a running trial's sweep says it is alive; one silent this long is gone
# imported once, by the forkserver the trials are forked from: each trial starts without ~5 s of imports
TRIAL_IMPORTS = ["peft_t5.sweeping", "peft_t5.training", "peft_t5.trainer", "peft_t5.modeling", "peft_t5.data",
                 "peft_t5.training_arguments"]
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial


@dataclass
class SweepResult:
    output_dir: str  # trials.md, trials.csv, plots/ and best/ (the best trial's adapter)
    states: dict  # how many trials ended in each state (COMPLETE, PRUNED, FAIL)
    best_trial: int | None = None
    best_value: float | None = None
    best_flags: dict = field(default_factory=dict)  # train's flags that retrain the best trial


def sweep(config: str, output_dir: str = "runs/sweep", workers: int = 1, storage: str | None = None,
          study_name: str = "sweep", objective: str | None = None, keep_all: bool = False) -> SweepResult:
    """An Optuna study over train's flags, from a sweep file (train: fixed flags, space: flags to search, trials...):
    each trial trains in a process of its own; the study lives in SQLite in output_dir (or `storage`), so a stopped
    sweep continues where it was."""
    from .checks import check_ranges

    check_ranges({"workers": workers}, workers=(1, 256))
    return Sweep(read_sweep_config(config, objective), output_dir, storage=storage, study_name=study_name,
                 workers=workers, keep_all=keep_all).run()


@dataclass
class SweepConfig:
    train: dict  # fixed flags, as train_lora.py takes them
    space: dict  # flag -> list (categorical) or {low, high, log, step}
    trials: int
    sampler: str = "tpe"
    objective: str = ""
    direction: str = ""
    pruner: str = "median"  # median, or none
    path: str = field(default="", compare=False)


def read_sweep_config(path: str, objective: str | None = None) -> SweepConfig:
    """The sweep file, every key and search range checked, naming the file and key at fault."""
    from .arguments import all_flags, closest, read_config
    from .tasks import get_task

    raw = read_config(path)
    for key in raw:
        if key not in KEYS:
            raise PeftT5Error(f"{path}: unknown key '{key}'{closest(key, KEYS)}; a sweep file has {', '.join(KEYS)}")
    train, space = raw.get("train"), raw.get("space")
    if not isinstance(train, dict) or "task" not in train:
        raise PeftT5Error(f"{path}: train: expected the fixed training flags with a task, e.g. "
                          "train: {task: jokes, model: tiny, max_steps: 20}")
    if not isinstance(space, dict) or not space:
        raise PeftT5Error(f"{path}: space: expected flags to search, e.g. learning_rate: {{low: 1.0e-4, high: 1.0e-2, "
                          "log: true}")
    if "output_dir" in train:
        raise PeftT5Error(f"{path}: train: output_dir: the sweep gives each trial a folder of its own; pass "
                          "--output_dir to peft-t5 sweep instead")
    known = all_flags()
    for name in train:
        if known and name not in known:
            raise PeftT5Error(f"{path}: train: unknown flag '{name}'{closest(name, known)}")
    try:
        get_task(train["task"])
        for method in space.get("method", [train.get("method", "lora")]):
            get_method(method)
    except PeftT5Error as e:
        raise PeftT5Error(f"{path}: {e}") from None
    for name, values in space.items():
        if known and name not in known:
            raise PeftT5Error(f"{path}: space: unknown flag '{name}'{closest(name, known)}")
        if name in train:
            raise PeftT5Error(f"{path}: space: {name} is also fixed in train; keep it in one of them")
        check_range(path, name, values)
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise PeftT5Error(f"{path}: sampler: {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    objective = objective or raw.get("objective") or get_task(train["task"]).sweep_objective
    direction = raw.get("direction") or ("minimize" if "loss" in objective else "maximize")
    if direction not in ("minimize", "maximize"):
        raise PeftT5Error(f"{path}: direction: {direction!r}; choose minimize or maximize")
    config = SweepConfig(train, space, 0, sampler, objective, direction, str(raw.get("pruner", "median")), path)
    trials = raw.get("trials", len(grid(config)) if sampler == "grid" else 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise PeftT5Error(f"{path}: trials: {trials!r}; expected a number of trials, at least 1")
    if config.pruner not in ("median", "none"):
        raise PeftT5Error(f"{path}: pruner: {config.pruner!r}; choose median or none")
    config.trials = trials
    check_trial_settings(config)
    return config


def check_trial_settings(config: SweepConfig) -> None:
    """Once, before the first trial: the fixed train flags pass train's own checks (data files, model, ranges), and
    every value the space may draw is one its method takes (lora_r 0 would fail each trial that drew it)."""
    from .train_settings import precheck

    try:
        precheck({**TRIAL_DEFAULTS, **config.train}, [], output=False)
    except PeftT5Error as e:
        raise PeftT5Error(f"{config.path}: train: {e}") from None
    methods = config.space.get("method", [config.train.get("method", "lora")])
    for name, values in config.space.items():
        if name not in METHOD_FLAGS:
            continue
        drawn = values if isinstance(values, list) else [values["low"], values["high"]]
        for method in methods:
            if name not in TRAINABLE[method].flags:
                continue
            for value in drawn:
                try:
                    TRAINABLE[method].settings({name: decode(encode(value))})
                except PeftT5Error as e:
                    raise PeftT5Error(f"{config.path}: space: {name}: {e} (with method {method})") from None


def check_range(path: str, name: str, values) -> None:
    where = f"{path}: space: {name}"
    if isinstance(values, list):
        if not values:
            raise PeftT5Error(f"{where}: an empty list; give the values to try")
        return
    if not isinstance(values, dict) or set(values) - {"low", "high", "log", "step"} or not {"low", "high"} <= set(values):
        raise PeftT5Error(f"{where}: expected a list of values, or {{low: A, high: B}} with log: true or step: S")
    low, high = values["low"], values["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, values.get("step", 1))):
        raise PeftT5Error(f"{where}: low, high and step must be numbers (YAML reads 1e-4 as text: write 1.0e-4)")
    if not low < high:
        raise PeftT5Error(f"{where}: low {low} is not below high {high}")
    if values.get("log") and (low <= 0 or "step" in values):
        raise PeftT5Error(f"{where}: log: true needs low above 0 and no step")


def grid(config: SweepConfig) -> list[dict]:
    """Every distinct configuration of a grid space; a flag the method does not take is left out, so ia3 is tried once,
    not once per lora_r (why this is enqueued rather than Optuna's GridSampler, which crosses every flag)."""
    axes = {}
    for name, values in config.space.items():
        if isinstance(values, list):
            axes[name] = [encode(v) for v in values]
        elif "step" in values:
            count = int(round((values["high"] - values["low"]) / values["step"])) + 1
            axes[name] = [values["low"] + i * values["step"] for i in range(count)]
        else:
            raise PeftT5Error(f"{config.path}: space: {name}: a grid needs a list of values or a step")
    points = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        takes = TRAINABLE[point.get("method", config.train.get("method", "lora"))].flags
        point = {k: v for k, v in point.items() if k not in METHOD_FLAGS or k in takes}
        if point not in points:
            points.append(point)
    return points


def encode(value):
    """Optuna's categorical choices are scalars: a list (target_modules) goes in as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode(value):
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def suggest(trial: optuna.Trial, config: SweepConfig) -> dict:
    """The trial's flags, asked of Optuna in order, method first: a flag of a method the trial did not draw is not
    asked (lora_r for ia3)."""
    space = config.space
    method = trial.suggest_categorical("method", [encode(v) for v in space["method"]]) if "method" in space \
        else config.train.get("method", "lora")
    takes = TRAINABLE[method].flags
    params = {"method": method} if "method" in space else {}
    for name, values in space.items():
        if name == "method" or (name in METHOD_FLAGS and name not in takes):
            continue
        if isinstance(values, list):
            params[name] = decode(trial.suggest_categorical(name, [encode(v) for v in values]))
        elif all(isinstance(values.get(k, 1), int) for k in ("low", "high", "step")):
            params[name] = trial.suggest_int(name, values["low"], values["high"], step=values.get("step", 1),
                                             log=values.get("log", False))
        else:
            params[name] = trial.suggest_float(name, values["low"], values["high"], step=values.get("step"),
                                               log=values.get("log", False))
    return params


def trial_flags(config: SweepConfig, params: dict, folder: Path) -> dict:
    defaults = dict(TRIAL_DEFAULTS, generation_eval_samples=0) if config.objective == "eval_loss" else TRIAL_DEFAULTS
    return {**defaults, **config.train, **params, "output_dir": str(folder)}


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, config.trials // 4)))


def make_sampler(config: SweepConfig) -> optuna.samplers.BaseSampler:
    seed = int(config.train.get("seed", 42))
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, config.trials // 3)))
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every point is enqueued; random: as it says


def storage_for(url: str):
    """An Optuna storage for the URL: a database (sqlite, postgresql, mysql, ... through SQLAlchemy), or journal:PATH,
    Optuna's journal file, for machines that share a filesystem but no database."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if url.startswith("sqlite:"):  # trials' processes write beside the sweep: wait for SQLite's lock, not fail
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def shown_url(url: str) -> str:
    """A storage URL as it may be printed: its password hidden."""
    if url.startswith(("journal:", "sqlite:")):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: nothing in it to hide
        return url


def open_storage(url: str):
    """storage_for, with what fails said in one line naming the storage (its host), never the password."""
    try:
        return storage_for(url)
    except ImportError:
        raise PeftT5Error(f"--storage {shown_url(url)}: its database driver is not installed; pip install "
                          "'peft-t5[sweep-rdb]' (psycopg for PostgreSQL)") from None
    except Exception as e:  # SQLAlchemy's, the drivers' and the journal's errors
        raise storage_error(url, e) from None


def storage_error(url: str, e: Exception) -> PeftT5Error:
    """A storage's failure (opening it, or the study in it) in one line: the storage, never its password, and why."""
    cause = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
    return PeftT5Error(f"--storage {shown_url(url)}: cannot open the study there ({type(e).__name__}: {cause}); pass "
                       "an Optuna storage URL that can be reached, e.g. postgresql://user@host/db or "
                       "journal:/shared/sweep.log")


class Sweep:
    """One sweep folder: the study, its workers, and the files written at the end."""

    def __init__(self, config: SweepConfig, folder: str, storage: str | None = None, study_name: str = "sweep",
                 workers: int = 1, keep_all: bool = False):
        self.config, self.folder, self.workers, self.keep_all = config, Path(folder), workers, keep_all
        self.storage_url = storage or f"sqlite:///{self.folder.resolve() / 'study.db'}"
        self.study_name, self.lock, self.failures = study_name, threading.Lock(), []
        self.study: optuna.Study | None = None
        self.trials = multiprocessing.get_context("forkserver")
        self.trials.set_forkserver_preload(TRIAL_IMPORTS)

    def open(self) -> None:
        """Create or reopen the study; a study of another sweep config is refused; trials whose sweep process died
        are failed as interrupted and run again with the same flags."""
        check_sweep_folder(self.folder)
        made = not self.folder.exists()
        if self.storage_url.startswith("sqlite:///") and self.folder.resolve() == \
                Path(self.storage_url.removeprefix("sqlite:///")).parent:
            self.folder.mkdir(parents=True, exist_ok=True)  # the default storage lives in the sweep folder
        try:
            storage = open_storage(self.storage_url)
            sampler, pruner = make_sampler(self.config), make_pruner(self.config)
            try:  # one sweep creates the study (the storage refuses a second with its name): it alone sets it up
                self.study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                                 direction=self.config.direction, pruner=pruner)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                self.study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                               pruner=pruner)
                created = False
        except Exception as e:
            if made:
                shutil.rmtree(self.folder, ignore_errors=True)
            if isinstance(e, PeftT5Error):
                raise
            raise storage_error(self.storage_url, e) from None
        mine = {k: v for k, v in asdict(self.config).items() if k != "path"}
        if created:
            self.study.set_user_attr("ready", False)
            self.study.set_user_attr("config", mine)
            self.study.set_user_attr("config_path", self.config.path)
            for point in grid(self.config) if self.config.sampler == "grid" else ():
                self.study.enqueue_trial(point)
            self.study.set_user_attr("ready", True)
        recorded = self.study_config()
        if recorded != mine:
            original = self.study.user_attrs.get("config_path", "another sweep file")
            if made:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise PeftT5Error(f"study '{self.study_name}' in {shown_url(self.storage_url)} was started from "
                              f"{original}, whose settings differ from {self.config.path}'s; pass {original} again, "
                              "or a new --output_dir or --study_name")
        (self.folder / "trials").mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)
        self.fail_stale()

    def study_config(self) -> dict:
        """The config the study was started with, once its creator has set it up (a sweep that joins a study as it
        is created waits for its grid to be enqueued)."""
        waited = 0.0
        while (attrs := self.study.user_attrs).get("config") is None or attrs.get("ready") is False:
            if waited >= 60:
                raise PeftT5Error(f"study '{self.study_name}' in {shown_url(self.storage_url)} was created but never "
                                  "set up (its first sweep stopped as it started); pass a new --study_name")
            time.sleep(0.5)
            waited += 0.5
        return attrs["config"]

    def fail_stale(self) -> None:
        """RUNNING trials whose sweep process is gone (here: its pid; on another machine: no heartbeat for GRACE_S)
        are failed as interrupted and run again once, by whichever sweep process asks next."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid, host = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
            gone = (host == HOST and isinstance(pid, int) and pid != os.getpid() and not process_alive(pid)) or \
                (host is not None and host != HOST and time.time() - trial.user_attrs.get("alive_at", time.time()) >
                 GRACE_S)
            if gone:
                self.fail_interrupted(trial)

    def fail_interrupted(self, trial) -> None:
        # FrozenTrial has no public id; Trial(study, id) is how Optuna's own integrations write to a trial
        live = optuna.Trial(self.study, trial._trial_id)
        try:
            live.set_user_attr("reason", f"{INTERRUPTED}: its sweep process ended; run again with the same flags")
            self.study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another sweep process failed it first, and enqueued its retry
            return
        self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        shutil.rmtree(self.folder / "trials" / f"{trial.number:03d}", ignore_errors=True)
        print(f"trial {trial.number} was interrupted when its sweep stopped: it runs again as a new trial", flush=True)

    def counted(self, below: int | None = None) -> int:
        """Trials that use the budget (of those numbered below `below`): finished ones (but not those interrupted and
        retried, nor those asked past the budget) and running ones."""
        trials = self.study.get_trials(deepcopy=False)
        return sum((t.state == TrialState.RUNNING or t.state.is_finished() and not retried(t))
                   and (below is None or t.number < below) for t in trials)

    def run(self) -> SweepResult:
        self.open()
        started = time.time()
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.5)
        except KeyboardInterrupt:  # the trials' processes had the Ctrl-C too
            raise Interrupted("interrupted; finished trials are kept in the study: run the same command again to "
                              "continue (the interrupted trials run again)") from None
        if self.failures:
            raise self.failures[0]
        return self.finish(time.time() - started)

    def worker(self) -> None:
        try:
            while True:
                with self.lock:
                    self.fail_stale()
                    if self.counted() >= self.config.trials:
                        return
                    trial = self.study.ask()
                    # sweeps on other machines ask too: the first `trials` numbers run, a later one is given back
                    if self.counted(below=trial.number) >= self.config.trials:
                        trial.set_user_attr("reason", f"{SURPLUS}: the study's {self.config.trials} trials were "
                                                      "taken by the sweeps beside this one")
                        self.study.tell(trial, state=TrialState.FAIL)
                        return
                    params = suggest(trial, self.config)
                    trial.set_user_attr("host", HOST)
                    trial.set_user_attr("pid", os.getpid())
                    trial.set_user_attr("alive_at", time.time())
                self.run_trial(trial, params)
        except Exception as e:  # a storage or sweep error: say it from the main thread
            self.failures.append(e if isinstance(e, PeftT5Error) else PeftT5Error(f"sweep worker: {e}"))

    def run_trial(self, trial: optuna.Trial, params: dict) -> None:
        name = f"{trial.number:03d}"
        folder, log, result = self.folder / "trials" / name, self.folder / "logs" / f"{name}.log", \
            self.folder / "logs" / f"{name}.result.json"
        flags = self.folder / "logs" / f"{name}.flags.json"
        flags.write_text(json.dumps(trial_flags(self.config, params, folder), indent=1) + "\n", encoding="utf-8")
        print(f"trial {trial.number} started: {shown(params)}", flush=True)
        trial.set_user_attr("folder", f"{HOST}:{folder.resolve()}")  # where its adapter is, for any machine's report
        spec = {"storage": self.storage_url, "study": self.study_name, "trial_id": trial._trial_id,
                "objective": self.config.objective, "config": asdict(self.config), "flags": str(flags),
                "result": str(result), "log": str(log)}
        started = time.time()
        child = self.trials.Process(target=trial_process, args=(spec,), name=f"trial {trial.number}")
        child.start()
        child.join(HEARTBEAT_S)
        while child.exitcode is None:  # still training: said for the sweeps on other machines (fail_stale)
            trial.set_user_attr("alive_at", time.time())
            child.join(HEARTBEAT_S)
        code = child.exitcode
        wall = time.time() - started
        outcome = json.loads(result.read_text(encoding="utf-8")) if result.exists() else \
            {"state": "FAIL", "reason": last_line(log) or f"its process ended with status {code}"}
        for key in ("trainable_parameters", "peak_memory_mb", "tokens_per_s", "train_s", "steps_s", "reason"):
            if outcome.get(key) is not None:
                trial.set_user_attr(key, outcome[key])
        trial.set_user_attr("wall_s", round(wall, 1))
        trial.set_user_attr("interval", [started, started + wall])
        state = TrialState[outcome["state"]]
        self.study.tell(trial, outcome.get("value") if state == TrialState.COMPLETE else None, state=state)
        self.progress(trial.number, state, outcome, wall)

    def progress(self, number: int, state: TrialState, outcome: dict, wall: float) -> None:
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished() and not retried(t)]
        walls = [t.user_attrs["wall_s"] for t in done if "wall_s" in t.user_attrs]
        left = max(self.config.trials - len(done), 0) * (sum(walls) / max(len(walls), 1)) / self.workers
        what = f"{self.config.objective} {outcome['value']:.4g}" if state == TrialState.COMPLETE else outcome["reason"]
        best = self.best()
        best_said = f" (best {best.value:.4g}, trial {best.number})" if best else ""
        print(f"trial {number} {state.name}: {what}{best_said}; {wall:.0f} s; {len(done)} of {self.config.trials} "
              f"done, ~{left / 60:.1f} min left", flush=True)

    def best(self):
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self.study.best_trial if complete else None

    def finish(self, wall: float) -> SweepResult:
        """The table, the plots, the best trial's adapter, the overhead, and the line that retrains the best."""
        from .sweep_report import plot_sweep, write_tables

        trials = self.study.get_trials(deepcopy=False)
        best = self.best()
        write_tables(trials, self.config, self.folder, best.number if best else None)
        plotted = plot_sweep(self.study, self.config, self.folder / "plots")
        here = best is not None and (self.folder / "trials" / f"{best.number:03d}").is_dir()
        if best is not None:
            keep_best(self.folder, best.number, self.keep_all)
        intervals = sorted(tuple(t.user_attrs["interval"]) for t in trials if "interval" in t.user_attrs)
        summary = {"wall_s": round(wall, 1), "trials_s": round(covered(intervals), 1), "workers": self.workers,
                   "plots": plotted}
        summary["overhead_share"] = round(max(wall - summary["trials_s"], 0) / wall, 4) if intervals and wall else None
        (self.folder / "sweep.json").write_text(json.dumps({"config": asdict(self.config), **summary}, indent=1)
                                                + "\n", encoding="utf-8")
        counts = state_counts(trials)
        print(f"sweep: {', '.join(f'{n} {s.lower()}' for s, n in counts.items())}; {self.folder}/trials.md, "
              f"trials.csv and plots/ written")
        result = SweepResult(str(self.folder), counts)
        if best is None and counts.get("RUNNING"):
            print(f"{counts['RUNNING']} trials still run in the sweeps beside this one; any machine gathers the study "
                  f"when they end: peft-t5 sweep report --storage {shown_url(self.storage_url)} --study_name "
                  f"{self.study_name} --output_dir DIR")
            return result
        if best is None:
            raise PeftT5Error(f"no trial completed, so there is nothing to retrain: {self.folder}/trials.md gives each "
                              "trial's reason")
        flags = retrain_flags(self.config, best)
        where = f"{self.folder}/best" if here else adapter_location(best)
        print(f"best: trial {best.number}, {self.config.objective} {best.value:.4g}, {shown(best.params)}; adapter in "
              f"{where}; retrain it: {retrain_command(flags)}")
        result.best_trial, result.best_value, result.best_flags = best.number, best.value, flags
        return result


def report(storage: str, output_dir: str, study_name: str = "sweep") -> SweepResult:
    """trials.md, trials.csv and the plots of a study, from its storage alone (any machine, at any time: running
    trials are listed as RUNNING), and the line that retrains the best trial so far."""
    from .sweep_report import plot_sweep, write_tables

    folder = Path(output_dir)
    check_sweep_folder(folder)
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise PeftT5Error(f"--study_name {study_name}: no such study in {shown_url(storage)}; pass the name its sweeps "
                          "were given") from None
    recorded = study.user_attrs.get("config")
    if recorded is None:
        raise PeftT5Error(f"study '{study_name}' in {shown_url(storage)} was not started by peft-t5 sweep (it records "
                          "no sweep config); pass a study a sweep made")
    config = SweepConfig(**recorded, path=study.user_attrs.get("config_path", ""))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    folder.mkdir(parents=True, exist_ok=True)
    write_tables(trials, config, folder, best.number if best else None)
    plot_sweep(study, config, folder / "plots")
    counts = state_counts(trials)
    print(f"study '{study_name}': {', '.join(f'{n} {s.lower()}' for s, n in counts.items())} of {config.trials} "
          f"trials; {folder}/trials.md, trials.csv and plots/ written")
    result = SweepResult(str(folder), counts)
    if best is not None:
        flags = retrain_flags(config, best)
        print(f"best so far: trial {best.number}, {config.objective} {best.value:.4g}, adapter at "
              f"{adapter_location(best)}; retrain it: {retrain_command(flags)}")
        result.best_trial, result.best_value, result.best_flags = best.number, best.value, flags
    return result


def state_counts(trials) -> dict[str, int]:
    """How many trials are in each state, for the states some trial is in."""
    return {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}


def retrain_flags(config: SweepConfig, best) -> dict:
    """The train flags of a trial: the fixed ones and its drawn values."""
    return {**config.train, **{k: decode(v) for k, v in best.params.items()}}


def adapter_location(trial) -> str:
    """Where a trial's adapter is, for any machine: host:folder while its sweep runs; the best one so far moves to
    that sweep's best/ when it ends."""
    recorded = trial.user_attrs.get("folder")
    if not recorded:
        return "(not recorded)"
    host, _, folder = recorded.partition(":")
    return f"{recorded} (in {host}:{Path(folder).parent.parent}/best once the sweep that ran it has ended)"


def retried(trial) -> bool:
    """A trial that does not count: failed as interrupted (its flags run again as another trial), or asked past the
    budget by a sweep beside another (never run)."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("reason", "").startswith((INTERRUPTED, SURPLUS))


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one trial ran (the union of the intervals)."""
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def shown(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def retrain_command(flags: dict) -> str:
    words = ["python", "scripts/train_lora.py"]
    for key, value in flags.items():
        if isinstance(value, bool):
            words += [f"--{key}", str(value).lower()]
        elif isinstance(value, list):
            words += [f"--{key}", *map(str, value)]
        else:
            words += [f"--{key}", str(value)]
    return shlex.join(words)


def keep_best(folder: Path, number: int, keep_all: bool) -> None:
    """best/: the best trial's folder (hard links, replaced in one step); the other trials' folders go, unless
    --keep_all."""
    from .adapters import write_atomically

    source = folder / "trials" / f"{number:03d}"
    if source.is_dir():
        write_atomically(folder / "best", lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True,
                                                                      copy_function=os.link), owns=("*",))
    for trial_dir in (folder / "trials").iterdir() if not keep_all else ():
        if trial_dir.is_dir() and trial_dir != source:
            shutil.rmtree(trial_dir, ignore_errors=True)


def check_sweep_folder(folder: Path) -> None:
    """The sweep folder is new, empty, or one this toolkit's sweep wrote; nothing else in it is touched."""
    from .adapters import check_writable_folder

    check_writable_folder(folder, "--output_dir")
    ours = {"study.db", "trials", "logs", "plots", "best", "trials.csv", "trials.md", "sweep.json"}
    if folder.is_dir():  # and the temporary files of its saves: .best.saving-*, .trials.csv.tmp, ...
        foreign = sorted(p.name for p in folder.iterdir()
                         if p.name not in ours and not p.name.startswith((".best.", ".trials.")))
        if foreign:
            raise PeftT5Error(f"--output_dir {folder} holds files a sweep did not write ({', '.join(foreign[:3])}); "
                              "pass a new or empty folder")


def die_with_sweep() -> None:
    """End this trial's process as soon as the sweep's process ends, killed with -9 too, so that no trial trains on
    unwatched: multiprocessing's parent sentinel closes when the sweep dies. (Linux's PR_SET_PDEATHSIG would watch the
    forkserver instead, which lives on while any trial holds its pipe.)"""
    sweep = multiprocessing.parent_process()
    if sweep is None:
        return

    def watch() -> None:
        sweep.join()
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="peft-t5-sweep-watch").start()


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ")[:300] if lines else ""


def reporter(spec: dict):
    """A Trainer callback that reports each evaluation's objective to the trial and stops it if the pruner says so."""
    from transformers import TrainerCallback

    class ReportToOptuna(TrainerCallback):
        def __init__(self):
            config = SweepConfig(**spec["config"])
            study = optuna.load_study(study_name=spec["study"], storage=storage_for(spec["storage"]),
                                      pruner=make_pruner(config))
            self.trial, self.objective, self.reported = optuna.Trial(study, spec["trial_id"]), spec["objective"], set()
            self.trainable, self.tokens_per_s, self.training = None, None, False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.training = True
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False  # the final evaluation is the result, not a step to prune at

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            self.tokens_per_s = logs.get("tokens_per_s", self.tokens_per_s)
            value = logs.get(self.objective)
            if value is None or not self.training or state.global_step in self.reported:
                return
            self.reported.add(state.global_step)
            self.trial.report(value, state.global_step)
            if state.global_step < state.max_steps and self.trial.should_prune():  # the last evaluation is the result
                raise optuna.TrialPruned(f"pruned at step {state.global_step}: {self.objective} {value:.4g} is worse "
                                         "than the median of earlier trials there")

    return ReportToOptuna()


def trial_main(spec: dict) -> int:
    """One trial, in its own process: train with the trial's flags, write what happened for the sweep to read."""
    import resource

    import torch

    from .training import train

    callback = reporter(spec)
    outcome: dict = {}
    started = time.perf_counter()  # the trial's own time: not its process's start (the first one's forkserver)
    try:
        metrics = train(spec["flags"], callbacks=(callback,)).metrics
        value = metrics.get(spec["objective"])
        outcome = {"state": "COMPLETE", "value": value} if value is not None else \
            {"state": "FAIL", "reason": f"the run reported no {spec['objective']} (it has: "
                                        f"{', '.join(k for k in metrics if k.startswith('eval_'))}); set objective"}
    except optuna.TrialPruned as e:
        outcome = {"state": "PRUNED", "reason": str(e)}
    except PeftT5Error as e:
        outcome = {"state": "FAIL", "reason": str(e)}
    meta = Path(json.loads(Path(spec["flags"]).read_text(encoding="utf-8"))["output_dir"]) / "peft_t5.json"
    throughput = json.loads(meta.read_text(encoding="utf-8")).get("throughput", {}) if meta.exists() else {}
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    outcome.update(trainable_parameters=callback.trainable, peak_memory_mb=round(peak, 1),
                   tokens_per_s=throughput.get("tokens_per_s", callback.tokens_per_s),
                   train_s=round(time.perf_counter() - started, 1), steps_s=throughput.get("train_seconds"))
    from .sweep_report import replace

    replace(Path(spec["result"]), json.dumps(outcome))
    if outcome["state"] == "FAIL":
        print(f"error: {outcome['reason']}", file=sys.stderr)
    return 0


def trial_process(spec: dict) -> None:
    """A trial's process: its output to the trial's log, then trial_main."""
    from .logs import setup_logging

    die_with_sweep()
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    setup_logging()
    trial_main(spec)
