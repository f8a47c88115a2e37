"""Where one decoder step of the serving engine spends its time: torch.profiler over T5Runner.step at jokes prompts
(short sources, so the step is the decoder's), t5-small shapes (or --config flan-t5-large; random weights), 2 LoRA
adapters mixed per row, 1 thread, float32 (or int8), the compiled step (or --eager). Writes the top operators by self
CPU time, and the step's mean time, as Markdown.

python benchmarks/step_profile.py [--rows 32] [--config t5-small] [--steps 20] [--int8] [--eager] [--output benchmarks/results/step_profile.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--config", choices=["t5-small", "flan-t5-large"], default="t5-small",
                        help="The base's shapes (benchmarks/configs), random weights")
    parser.add_argument("--steps", type=int, default=20, help="Steps profiled (after as many warm-up steps)")
    parser.add_argument("--int8", action="store_true", help="After quantize_int8, as serve --quantize int8")
    parser.add_argument("--eager", action="store_true", help="The eager step (serve --compile off)")
    parser.add_argument("--cache_dtype", choices=["float32", "bfloat16"], default=None,
                        help="The attention caches' dtype (default: the model's)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", default="benchmarks/results/step_profile.md")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from peft_t5.bank import AdapterBank
    from peft_t5.quantize import quantize_int8
    from peft_t5.serve.compiled import CompiledStep
    from peft_t5.serve.decoding import argmax
    from peft_t5.serve.t5_runner import T5Runner

    torch.set_num_threads(1)
    records, _ = jokes_records()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_adapters(Path(tmp), args.config)
        bank = AdapterBank.load(base, adapters)
    if args.int8:
        quantize_int8(*bank.models())
    model = bank.holders[list(adapters)[0]]  # the PeftModel whose LoRA adapters mix per row, as the engine steps it
    names = [bank.peft_name(list(adapters)[i % 2]) for i in range(args.rows)]
    sources = [bank.tokenizer(r["question"]).input_ids for r in records[:args.rows]]
    compiled = None if args.eager else CompiledStep()
    runner = T5Runner(model, capacity=args.rows, compiled=compiled,
                      cache_dtype=getattr(torch, args.cache_dtype) if args.cache_dtype else None)
    runner.warm(sorted(set(names)))
    if compiled is not None:
        compiled.wait()
    runner.add(sources, names, budgets=[4 * args.steps] * args.rows)
    tokens = torch.zeros(args.rows, dtype=torch.long)
    for _ in range(args.steps):  # warm-up: allocations, and lengths like those profiled
        tokens = argmax(runner.step(tokens))
    started = time.process_time()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            tokens = argmax(runner.step(tokens))
    step_ms = (time.process_time() - started) / args.steps * 1000  # under the profiler: its overhead included
    plain = time.process_time()
    for _ in range(args.steps):
        tokens = argmax(runner.step(tokens))
    plain_ms = (time.process_time() - plain) / args.steps * 1000
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
    by_shape = prof.key_averages(group_by_input_shape=True).table(  # which matmul: the output projection, q/k/v/o, ...
        sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=24, max_shapes_column_width=50)
    header = (f"# One decoder step, {args.rows} rows, jokes prompts, {args.config} shapes, 2 LoRA adapters mixed, "
              f"{'int8' if args.int8 else 'float32'}, {'eager' if args.eager else 'compiled'} step, 1 thread\n\n{machine()}, {time.strftime('%Y-%m-%d')}; "
              f"{plain_ms:.1f} ms of CPU a step without the profiler ({step_ms:.1f} ms under it)\n\n```\n")
    text = header + table + "\n```\n\nThe same, by input shape:\n\n```\n" + by_shape + "\n```\n"
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
