"""The engine's encoder pass (new rows' encoder and every decoder layer's cross-attention K/V: t5_runner.Encode)
compiled against eager, in one process, in turn: t5-small shapes (random weights), 2 LoRA adapters mixed per row,
1 thread, real jokes questions (1 row) and SQuAD v2 questions with their contexts (1, 8 and 32 rows), float32 and
int8 (quantize_int8, as serve --quantize int8). Each graph is compiled (compiled.CompiledStep, the settings serve
uses) before anything is timed; CPU milliseconds per pass, the median of --rounds. Rows alternate the two
adapters' slots, as T5Runner.add would give them.

python benchmarks/encoder_speed.py [--rounds 5] [--output benchmarks/results/encoder_speed.json]
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

CELLS = (("jokes", 1), ("squad", 1), ("squad", 8), ("squad", 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/encoder_speed.json")
    args = parser.parse_args()

    from peft_t5.bank import AdapterBank
    from peft_t5.quantize import quantize_int8
    from peft_t5.serve.compiled import CompiledStep
    from peft_t5.serve.t5_runner import T5Runner
    from peft_t5.tasks import get_task

    torch.set_num_threads(1)
    jokes, _ = jokes_records()
    squad, _ = squad_records(64)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "threads": 1,
               "setup": "t5-small shapes, random weights, 2 LoRA adapters (r16 q,v) mixed per row", "ms": {}}
    for precision in ("float32", "int8"):
        with tempfile.TemporaryDirectory() as tmp:
            base, adapters = make_adapters(Path(tmp), "t5-small")
            bank = AdapterBank.load(base, adapters)
        if precision == "int8":
            quantize_int8(*bank.models())
        sources = {prompts: [bank.tokenizer(get_task(prompts).template.format(**r), truncation=True,
                                            max_length=512).input_ids for r in records[:32]]
                   for prompts, records in (("jokes", jokes), ("squad", squad))}
        compiled = CompiledStep()
        runner = T5Runner(bank.holders[list(adapters)[0]], capacity=32, compiled=compiled)
        runner.warm([bank.peft_name(name) for name in adapters])
        compiled.wait()
        with torch.inference_mode():
            for prompts, rows in CELLS:
                encode, inputs = runner._encode_args(sources[prompts][:rows], [1 + i % 2 for i in range(rows)])
                encode(*inputs), compiled(encode, inputs)  # once untimed: int8's eager layers pack their weights
                times = {"eager": [], "compiled": []}  # for oneDNN on first use (one round: 124.7 ms against 17.2)
                for _ in range(args.rounds):  # in turn: the machine's drift falls on both alike
                    for way, run in (("eager", lambda: encode(*inputs)), ("compiled", lambda: compiled(encode, inputs))):
                        started = time.process_time()
                        run()
                        times[way].append((time.process_time() - started) * 1000)
                cell = {way: statistics.median(t) for way, t in times.items()}
                cell["compiled_vs_eager"] = cell["eager"] / cell["compiled"]
                cell["tokens"] = int(inputs[0].shape[1])
                results["ms"][f"{precision} {prompts} {rows}"] = cell
                print(f"{precision:8} {prompts} {rows:3} rows x {cell['tokens']:3} tokens: eager {cell['eager']:7.1f} ms, "
                      f"compiled {cell['compiled']:7.1f} ms, {cell['compiled_vs_eager']:.2f}x", flush=True)
        assert compiled.encodes["eager"] == 0, "a compiled pass ran eagerly: the graphs did not cover these shapes"
    write_results(results, args.output)


if __name__ == "__main__":
    main()
