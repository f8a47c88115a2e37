"""Peak memory of one training step: full fine-tuning, LoRA and QLoRA, measured at t5-small's shapes and
estimated from config.json (peft-t5 estimate) at flan-t5-large's, next to the figure the original jokes
write-up reported (flan-t5-large LoRA used 12 GB of GPU memory). python benchmarks/memory.py [--quick]
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, PeakMemory, device, machine, model_from_config, squad_records, write_results  # noqa: E402

from peft_t5.data import seq2seq_collator, tokenize  # noqa: E402
from peft_t5.estimate import estimate  # noqa: E402
from peft_t5.modeling import add_lora, load_tokenizer, quantize  # noqa: E402
from peft_t5.tasks import get_task  # noqa: E402

PUBLISHED_FLAN_T5_LARGE_LORA_GB = 12


def one_step_peak(config: str, setup: str, batch, steps: int = 2) -> float:
    """GiB above the starting point for building the model and `steps` training steps (Adafactor)."""
    from transformers.optimization import Adafactor

    gc.collect()
    with PeakMemory() as mem:
        if setup == "qlora":
            model = add_lora(quantize(model_from_config(config)))
        else:
            model = model_from_config(config)
            model = add_lora(model) if setup == "lora" else model
        model = model.to(device()).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False)
        for _ in range(steps):
            model(**{k: v.to(device()) for k, v in batch.items()}).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    del model, optimizer
    return (mem.peak - mem.start) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/memory.json")
    parser.add_argument("--config", default="t5-small", help="Measured shapes (benchmarks/configs/)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # measure one setup in this process
    args = parser.parse_args()
    tokenizer, task = load_tokenizer("tiny"), get_task("squad")
    records, _ = squad_records(args.batch_size)
    dataset, _ = tokenize(task, records, tokenizer, 512, 24)
    batch = seq2seq_collator(tokenizer)([dataset[i] for i in range(len(dataset))])
    batch.pop("length", None)
    if args.only:
        print(f"RESULT {one_step_peak(args.config, args.only, batch, 1 if args.quick else 2)}")
        return
    measured = {}
    for setup in ("full", "lora", "qlora"):  # one process each: a CPU process keeps the memory it freed
        cmd = [sys.executable, __file__, "--only", setup, "--config", args.config, "--batch_size", str(args.batch_size)]
        out = subprocess.run(cmd + ["--quick"] * args.quick, capture_output=True, text=True)
        line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"setup {setup} failed:\n{out.stderr[-3000:]}")
        measured[setup] = float(line.split()[1])
    for setup, gib in measured.items():
        print(f"{args.config} {setup:6} measured peak {gib:.3f} GiB", flush=True)
    estimates = {name: estimate(str(CONFIGS / f"{name}.json")) for name in (args.config, "flan-t5-large")}
    results = {
        "machine": machine(), "batch_size": args.batch_size, "source_tokens": int(batch["input_ids"].shape[1]),
        "measured_gib": {args.config: measured},
        "estimated_gib_weights_grads_optimizer": {n: {s: e[s]["total_gib"] for s in ("full", "lora", "qlora")}
                                                  for n, e in estimates.items()},
        "published_flan_t5_large_lora_gb": PUBLISHED_FLAN_T5_LARGE_LORA_GB,
        "note": "measured = weights + gradients + optimizer state + activations (CUDA allocator peak on a GPU, "
                "process RSS growth on a CPU); estimated = weights + gradients + optimizer state only",
        "lora_vs_full_memory_ratio": measured["lora"] / measured["full"],
        "qlora_vs_full_memory_ratio": measured["qlora"] / measured["full"],
    }
    for name, e in results["estimated_gib_weights_grads_optimizer"].items():
        print(f"{name} estimated (no activations): " + ", ".join(f"{s} {v:.2f} GiB" for s, v in e.items()))
    print(f"published: flan-t5-large LoRA used {PUBLISHED_FLAN_T5_LARGE_LORA_GB} GB of GPU memory (with activations)")
    write_results(results, args.output, (f"peak memory, one training step ({args.config})", list(measured),
                                         list(measured.values()), "GiB"))


if __name__ == "__main__":
    main()
