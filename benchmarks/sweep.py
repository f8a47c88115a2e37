"""`peft-t5 sweep` as a user runs it, on two tasks: a 12-trial jokes sweep on the bundled sample (methods lora, ia3,
prompt_tuning, vera x learning rate x rank) and a 6-trial squad sweep on the shared SQuAD v2 file (lora, vera and full
fine-tuning x learning rate), both on the tiny base. Keeps each sweep's table and plots under benchmarks/results/ and
the sweep's own overhead (start-up, storage, plots: the wall time with no trial running) against the trials' time.

python benchmarks/sweep.py [--output benchmarks/results/sweep.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_SQUAD, machine  # noqa: E402

SWEEPS = {
    "jokes": {"train": {"task": "jokes", "model": "tiny", "max_steps": 60, "max_source_length": 64,
                        "disable_tqdm": True},
              "space": {"method": ["lora", "ia3", "prompt_tuning", "vera"],
                        "learning_rate": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
                        "lora_r": {"low": 4, "high": 32, "step": 4}},
              "trials": 12},
    "squad": {"train": {"task": "squad", "model": "tiny", "data": str(REAL_SQUAD), "max_steps": 60,
                        "max_source_length": 256, "max_train_samples": 2000, "max_eval_samples": 64,
                        "generation_eval_samples": 64, "disable_tqdm": True},
              "space": {"method": ["lora", "vera", "full"],
                        "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True}},
              "trials": 6},
}


def run_sweep(name: str, config: dict, results: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.time()
        out = subprocess.run([sys.executable, "-m", "peft_t5", "sweep", str(path), "--output_dir", f"{tmp}/run"],
                             capture_output=True, text=True)
        wall = time.time() - started
        print(out.stdout, out.stderr[-2000:], sep="\n", flush=True)
        if out.returncode:
            raise SystemExit(f"the {name} sweep failed")
        run, keep = Path(tmp) / "run", results / f"sweep_{name}"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for file in ("trials.md", "trials.csv"):
            shutil.copy(run / file, keep / file)
        shutil.copytree(run / "plots", keep / "plots")
        summary = json.loads((run / "sweep.json").read_text())
        return {"command_wall_s": round(wall, 1), "sweep_wall_s": summary["wall_s"], "trials_s": summary["trials_s"],
                "overhead_share": round((wall - summary["trials_s"]) / wall, 4), "last_line":
                out.stdout.strip().splitlines()[-1], "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SWEEPS), help="Run one of the two sweeps")
    parser.add_argument("--output", default="benchmarks/results/sweep.json")
    args = parser.parse_args()
    output = Path(args.output)
    results = {"sweeps": json.loads(output.read_text())["sweeps"] if args.only and output.exists() else {}}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))  # --only: the other sweep's figures kept
    for name, config in SWEEPS.items():
        if args.only in (None, name):
            results["sweeps"][name] = s = run_sweep(name, config, Path(args.output).parent)
            print(f"{name}: {s['command_wall_s']:.0f} s, trials {s['trials_s']:.0f} s, the sweep's own share "
                  f"{100 * s['overhead_share']:.1f}%", flush=True)
    output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
