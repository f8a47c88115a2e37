"""The compiled decoder step with peft-t5's attention kernel (csrc/decode_attention.cpp) against the same step with
inductor's fused attention loops (PEFT_T5_ATTENTION=off), side by side in one process: t5-small shapes (random
weights), 2 LoRA adapters mixed per row, 1 thread, real jokes or SQuAD prompts (sources cut to 512 tokens), float32
(or int8). Each round decodes 8 steps unmeasured, then 24 measured (CPU time), each runner in turn; medians of
--rounds. The kernel's flag is set as each runner's graphs were traced (dynamo guards on it).

python benchmarks/attention_step.py [--prompts jokes|squad] [--int8] [--rows 1 8 32] [--rounds 5] [--output F]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", choices=["jokes", "squad"], default="jokes")
    parser.add_argument("--int8", action="store_true", help="After quantize_int8, as serve --quantize int8")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/attention_step.json")
    args = parser.parse_args()

    from peft_t5 import kernels
    from peft_t5.bank import AdapterBank
    from peft_t5.quantize import quantize_int8
    from peft_t5.serve.compiled import CompiledStep
    from peft_t5.serve.decoding import argmax
    from peft_t5.serve.t5_runner import T5Runner

    torch.set_num_threads(1)
    if kernels.attention_problem() is not None:
        sys.exit(f"peft-t5's attention kernel is not used here: {kernels.attention_problem()}")
    records = (squad_records() if args.prompts == "squad" else jokes_records())[0]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_adapters(Path(tmp), "t5-small")
        bank = AdapterBank.load(base, adapters)
    if args.int8:
        quantize_int8(*bank.models())
    model = bank.holders[list(adapters)[0]]
    texts = [r["question"] if args.prompts == "jokes" else f"question: {r['question']} context: {r['context']}"
             for r in records[:max(args.rows)]]
    sources = [bank.tokenizer(t, truncation=True, max_length=512).input_ids for t in texts]
    runners = {}
    for kernel in (True, False):
        kernels.attention_ready = kernel
        runner = T5Runner(model, capacity=max(args.rows), compiled=CompiledStep())
        runner.warm(sorted({bank.peft_name(a) for a in adapters}))
        runner.compiled.wait()
        runners["kernel" if kernel else "inductor"] = runner
    results = {"machine": machine(), "prompts": args.prompts, "precision": "int8" if args.int8 else "float32",
               "ms_per_step": {}, "ratios": {}}
    for rows in args.rows:
        names = [bank.peft_name(list(adapters)[i % 2]) for i in range(rows)]
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                kernels.attention_ready = name == "kernel"
                runner.add(sources[:rows], names, budgets=[40] * rows)
                tokens = torch.zeros(rows, dtype=torch.long)
                for _ in range(8):
                    tokens = argmax(runner.step(tokens))
                started = time.process_time()
                for _ in range(24):
                    tokens = argmax(runner.step(tokens))
                times[name].append((time.process_time() - started) / 24 * 1000)
                while runner.n:
                    runner.remove(runner.n - 1)
        assert all(r.compiled.steps["eager"] == 0 for r in runners.values()), "a step ran eagerly"
        medians = {name: statistics.median(t) for name, t in times.items()}
        results["ms_per_step"][str(rows)] = medians
        results["ratios"][f"kernel_vs_inductor_at_{rows}"] = round(medians["inductor"] / medians["kernel"], 3)
        print(f"{args.prompts} {results['precision']} {rows} rows: kernel {medians['kernel']:.2f} ms a step, "
              f"inductor's {medians['inductor']:.2f}: {medians['inductor'] / medians['kernel']:.2f}x", flush=True)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
