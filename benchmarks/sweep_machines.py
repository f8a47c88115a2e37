"""One 12-trial jokes sweep (tiny base, bundled sample) run by 1, 2 and 3 `peft-t5 sweep` processes sharing one study,
as on separate machines: each process in its own process group and folder, one thread each (OMP_NUM_THREADS=1). The
grid is the same 12 points whoever runs it (4 methods x 3 learning rates), so the runs differ only in how many
processes share it. Reports the wall time of each (the first start to the last end), its speedup over one process, and
where the time goes, summed over the processes: training steps, the rest of train() (model, data, evaluations,
saving), the trial's process around it (fork, results), and each sweep's own time outside its trials (start-up, the
shared storage, tables, plots).

On a 2-core machine the third process has no core of its own: its speedup shows the contention, not the scaling.

python benchmarks/sweep_machines.py [--quick] [--storage journal | postgresql://user:pw@host/db] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

SWEEP = {"train": {"task": "jokes", "model": "tiny", "max_steps": 60, "max_source_length": 64, "disable_tqdm": True},
         "space": {"method": ["lora", "ia3", "prompt_tuning", "vera"], "learning_rate": [1.0e-3, 1.0e-2, 1.0e-1]},
         "sampler": "grid", "pruner": "none", "trials": 12}


def run_processes(count: int, storage: str, study: str, tmp: Path) -> dict:
    config = tmp / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.time()
    procs = []
    for i in range(count):
        log = open(tmp / f"sweep{i}.out", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "peft_t5", "sweep", str(config), "--storage", storage,
                                       "--study_name", study, "--output_dir", str(tmp / f"machine{i}")],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))
    ends = []
    for proc in procs:
        proc.wait()
        ends.append(time.time() - started)
    if any(p.returncode for p in procs):
        raise SystemExit(f"a sweep failed: see {tmp}/sweep*.out\n" + (tmp / "sweep0.out").read_text()[-2000:])
    return {"processes": count, "wall_s": round(max(ends), 1), "process_wall_s": [round(e, 1) for e in ends],
            **where_time_goes(storage, study, tmp, count, ends)}


def where_time_goes(storage: str, study_name: str, tmp: Path, count: int, ends: list[float]) -> dict:
    import optuna

    from peft_t5.sweeping import storage_for

    trials = optuna.load_study(study_name=study_name, storage=storage_for(storage)).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    mine = {i: [t for t in done if f"{tmp / f'machine{i}'}" in t.user_attrs.get("folder", "")] for i in range(count)}
    steps = sum(t.user_attrs.get("steps_s") or 0 for t in done)
    train = sum(t.user_attrs.get("train_s", 0) for t in done)
    trial_walls = sum(t.user_attrs["wall_s"] for t in done)
    own = sum(ends[i] - sum(t.user_attrs["wall_s"] for t in mine[i]) for i in range(count))
    return {"complete": len(done), "other_trials": len(trials) - len(done),
            "trials_per_process": [len(mine[i]) for i in range(count)],
            "mean_trial_s": round(trial_walls / len(done), 2), "mean_steps_s": round(steps / len(done), 2),
            "process_s": {"training_steps": round(steps, 1), "model_data_evaluation_saving": round(train - steps, 1),
                          "trial_process": round(trial_walls - train, 1), "sweeps_own": round(own, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="journal", help="journal (a journal file in a temporary folder) or a "
                                                             "database URL (each run makes a study of its own there)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output", default="benchmarks/results/sweep_machines.json")
    parser.add_argument("--quick", action="store_true", help="A 4-point grid (lora, ia3 x 2 rates), 1 and 2 processes")
    args = parser.parse_args()
    if args.quick:
        SWEEP.update(trials=4, space={"method": ["lora", "ia3"], "learning_rate": [1.0e-3, 1.0e-2]})
        args.processes = [1, 2]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0],
               "storage": args.storage.split("://")[0], "sweep": SWEEP, "runs": []}
    for count in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            storage = f"journal:{tmp}/journal.log" if args.storage == "journal" else args.storage
            run = run_processes(count, storage, f"bench-{count}-{int(time.time())}", Path(tmp))
        run["speedup_over_one"] = round(results["runs"][0]["wall_s"] / run["wall_s"], 2) if results["runs"] else 1.0
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
