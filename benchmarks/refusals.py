"""How long `train_lora.py` takes to refuse a mistaken command: the mistakes found before the heavy imports against
one found only by the full parse after them (the baseline, in the same run). Each command runs in a fresh process,
as a user types it; the median of --repeats runs. Not a test: check `uptime` first.

    python benchmarks/refusals.py [--repeats 3] [--output benchmarks/results/refusals.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cases(folder: Path) -> dict[str, list[str]]:
    (folder / "wrong.csv").write_text("a,b\n1,2\n")
    (folder / "existing").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "existing" / name).write_text("{}")
    (folder / "foreign").mkdir()
    (folder / "foreign" / "notes.txt").write_text("mine")
    jokes = ["--task", "jokes", "--model", "tiny"]
    return {
        "--lora_rank 8": [*jokes, "--lora_rank", "8"],
        "--lora_r 0": [*jokes, "--lora_r", "0"],
        "data with the wrong columns": [*jokes, "--data", str(folder / "wrong.csv")],
        "a CSV for squad": ["--task", "squad", "--model", "tiny", "--data", "peft_t5/data/jokes_sample.csv"],
        "an existing adapter": [*jokes, "--output_dir", str(folder / "existing")],
        "a folder with a foreign file": [*jokes, "--output_dir", str(folder / "foreign")],
        "baseline: --eval_steps -3 (full parse)": [*jokes, "--eval_strategy", "steps", "--eval_steps", "-3",
                                                   "--output_dir", str(folder / "new")],
    }


def seconds_to_refuse(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/train_lora.py", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    took = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    return took, proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/refusals.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = cases(Path(tmp))
        rows = {}
        for name, argv in table.items():
            runs = [seconds_to_refuse(argv) for _ in range(args.repeats)]
            rows[name] = {"seconds": round(statistics.median(t for t, _ in runs), 2), "error": runs[0][1]}
    baseline = rows["baseline: --eval_steps -3 (full parse)"]["seconds"]
    for row in rows.values():
        row["vs_full_parse"] = round(row["seconds"] / baseline, 3)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    result = {"date": time.strftime("%Y-%m-%d"), "load_before": load, "repeats": args.repeats, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:40s} {row['seconds']:6.2f} s  {row['vs_full_parse']:.2f}x  {row['error'][:90]}")


if __name__ == "__main__":
    main()
