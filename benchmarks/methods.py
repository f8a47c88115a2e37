"""The PEFT methods and full fine-tuning side by side, in one run: trainable parameters (flan-t5-large shapes, from `estimate`), training
speed and peak memory on t5-small shapes with real SQuAD v2 lengths (each method as train_lora.py --method builds it,
through benchmarks/train_throughput.py, one process per method), and the validation loss each reaches after the
same number of steps on a learnable toy task (the bundled jokes on the tiny random-init base), so that a method that
silently does not train shows up.

python benchmarks/methods.py [--steps 4] [--toy_steps 150] [--methods lora full] [--output benchmarks/results/methods.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, machine, write_results  # noqa: E402

from peft_t5.estimate import estimate  # noqa: E402
from peft_t5.methods import TRAINABLE  # noqa: E402

TOY_LR = 1e-2  # one learning rate for all: the toy task shows whether a method trains, not its best setting


def speed(steps: int, output: Path, methods: list[str]) -> dict:
    setups = ["peft_t5_fp32" if name == "lora" else f"peft_t5_{name}" for name in methods]
    subprocess.run([sys.executable, str(Path(__file__).with_name("train_throughput.py")), "--setups", *setups,
                    "--steps", str(steps), "--output", str(output)], check=True)
    found = json.loads(output.read_text())["setups"]
    return {name: found["peft_t5_fp32" if name == "lora" else f"peft_t5_{name}"] for name in methods}


def toy_losses(steps: int, methods: list[str]) -> dict:
    """Validation loss before and after `steps` steps of each method on the bundled jokes, tiny base."""
    from peft_t5.commands.train import train

    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            out = Path(tmp) / name
            metrics = train(["--task", "jokes", "--model", "tiny", "--method", name, "--output_dir", str(out),
                             "--max_steps", str(steps), "--learning_rate", str(TOY_LR), "--eval_strategy", "no",
                             "--load_best_model_at_end", "false", "--report_to", "none", "--sample_generations", "0",
                             "--generation_eval_samples", "0", "--disable_tqdm", "true", "--max_eval_samples", "50"])
            meta = json.loads((out / "peft_t5.json").read_text())
            losses[name] = {"before": meta["eval_loss_before"], "after": metrics["eval_loss"]}
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="Timed training steps per method (t5-small shapes)")
    parser.add_argument("--toy_steps", type=int, default=150, help="Steps on the toy task per method")
    parser.add_argument("--methods", nargs="+", default=list(TRAINABLE), choices=list(TRAINABLE),
                        help="Rows to run; lora is always one (the ratios' baseline)")
    parser.add_argument("--output", default="benchmarks/results/methods.json")
    args = parser.parse_args()
    methods = ["lora", *[m for m in args.methods if m != "lora"]]
    large = estimate(str(CONFIGS / "flan-t5-large.json"))
    sizes = {**large["methods"], "full": {"trainable_parameters": large["trainable_parameters"]["full"]}}
    speeds = speed(args.steps, Path(args.output).with_name(Path(args.output).stem + "_throughput.json"), methods)
    toy = toy_losses(args.toy_steps, methods)
    lora_tps = speeds["lora"]["useful_tokens_per_s"]
    rows = {}
    for name in methods:
        method = TRAINABLE[name]
        s = speeds[name]
        rows[name] = {
            "trainable_parameters_flan_t5_large": sizes[name]["trainable_parameters"],
            "useful_tokens_per_s": s.get("useful_tokens_per_s"), "vs_lora": s.get("useful_tokens_per_s", 0) / lora_tps,
            "peak_memory_gib": s.get("peak_memory_gib"), "toy_loss_before": toy[name]["before"],
            "toy_loss_after": toy[name]["after"], "merge": method.can_merge, "mixed_batches": method.mixed_batches,
            "qlora": method.kbit}
        print(f"{name:14} {rows[name]['trainable_parameters_flan_t5_large']:>10,} params  "
              f"{rows[name]['vs_lora']:.2f}x LoRA tok/s  peak {rows[name]['peak_memory_gib']:.2f} GiB  "
              f"toy loss {toy[name]['before']:.3f} -> {toy[name]['after']:.3f}", flush=True)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "speed_setup": "t5-small shapes, real SQuAD v2 "
               f"lengths, batch 16, float32, {args.steps} timed steps", "toy_task": f"bundled jokes, tiny base, "
               f"{args.toy_steps} steps at lr {TOY_LR}", "methods": rows}
    write_results(results, args.output, ("Training speed vs LoRA (t5-small shapes, CPU)", list(rows),
                                         [r["vs_lora"] for r in rows.values()], "useful tokens/s, LoRA = 1"))


if __name__ == "__main__":
    main()
