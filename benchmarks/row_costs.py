"""What a row costs the engine by how it decodes and by its adapter's method, against greedy LoRA rows, in process
(the engine as `peft-t5 serve` runs it, its model thread on --threads torch threads): t5-small shapes (random
weights), real jokes questions, 32 rows at once, every row forced to exactly 32 new tokens.

  lora_greedy:  the baseline: 2 LoRA adapters, rows of both in every step, greedy
  lora_sampled: the same rows sampled (temperature 0.8, top_p 0.95)
  lora_beams:   8 inputs x 4 beams (32 rows), beam search
  <method>:     32 greedy rows of one adapter of each method (lora, dora, ia3, adalora, prompt_tuning, vera)

CPU milliseconds per row per token; ratio = the baseline's / the case's (>= 1.0x: a row costs no more than a greedy
LoRA row). Each round runs the baseline first and last, so that drift shows; each case's least is compared.

python benchmarks/row_costs.py [--threads 1] [--rounds 2] [--output benchmarks/results/row_costs.json]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, write_results  # noqa: E402
from methods_engine import method_adapters  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402

ROWS, TOKENS = 32, 32


def cases(lora: list[str], methods: list[str], sources: list[str]) -> dict[str, dict]:
    """Each case: the requests sent at once, as (names, sources, options) of engine.complete."""
    from peft_t5.serve.decoding import Sampling

    mixed = [lora[i % 2] for i in range(ROWS)]
    found = {"lora_greedy": [(mixed, sources, {})],
             "lora_sampled": [(mixed, sources, {"sampling": Sampling(temperature=0.8, top_p=0.95, seed=0)})],
             "lora_beams": [([lora[i % 2]], [sources[i]], {"num_beams": 4}) for i in range(ROWS // 4)]}
    for method in methods:
        found[method] = [([method] * ROWS, sources, {})]
    return found


async def cost(engine, requests: list, tokens: int = TOKENS) -> float:
    """CPU seconds of this process for these requests, all sent at once."""
    started = time.process_time()
    await asyncio.gather(*(engine.complete(names, texts, tokens, min_new_tokens=tokens, **options)
                           for names, texts, options in requests))
    return time.process_time() - started


async def run_all(bank, found: dict[str, list], threads: int, rounds: int) -> dict[str, list[float]]:
    from peft_t5.serve.engine import Engine

    engine = Engine(bank, max_rows=ROWS, max_encode_tokens=512 * ROWS, max_rows_per_request=ROWS, threads=threads)
    engine.start()
    try:
        for requests in found.values():  # warm-up: lanes, slots, packed projection, each method's first pass
            await cost(engine, requests, tokens=4)
        order = [*found, "lora_greedy"]  # the baseline first and last: drift shows
        seconds: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name in order:
                seconds.setdefault(name, []).append(await cost(engine, found[name]))
                print(f"{name:14s} {seconds[name][-1] / (ROWS * TOKENS) * 1000:.2f} CPU-ms a row-token", flush=True)
        return seconds
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine's model thread")
    parser.add_argument("--rounds", type=int, default=2, help="Times each case runs (the minimum is kept)")
    parser.add_argument("--output", default="benchmarks/results/row_costs.json")
    args = parser.parse_args()

    from peft_t5.bank import AdapterBank
    from peft_t5.tasks import get_task

    torch.set_num_threads(1)  # the main thread: the model thread gets --threads (as serve does)
    records, data = jokes_records()
    sources = [get_task("jokes").template.format(**r) for r in records[:ROWS]]
    with tempfile.TemporaryDirectory() as tmp:
        base, lora = make_adapters(Path(tmp), "t5-small")
        methods = method_adapters(Path(tmp) / "methods", base)
        bank = AdapterBank.load(base, {**lora, **methods})
        found = cases(list(lora), list(methods), sources)
        seconds = asyncio.run(run_all(bank, found, args.threads, args.rounds))
    per_token = {name: min(s) / (ROWS * TOKENS) * 1000 for name, s in seconds.items()}
    baseline = per_token["lora_greedy"]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "data": data, "rows": ROWS, "tokens": TOKENS,
               "threads": args.threads, "rounds": args.rounds, "cpu_seconds": seconds,
               "cpu_ms_per_row_token": per_token,
               "ratios": {name: baseline / ms for name, ms in per_token.items() if name != "lora_greedy"}}
    print({name: round(r, 2) for name, r in results["ratios"].items()})
    write_results(results, args.output, ("CPU-ms a row-token, 32 rows (lower is better)", list(per_token),
                                         list(per_token.values()), "CPU ms"))


if __name__ == "__main__":
    main()
