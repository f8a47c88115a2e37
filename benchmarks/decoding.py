"""Decoding in the continuous engine, each case against its baseline in the same run, in process (the engine as
`peft-t5 serve` runs it: the model thread gets the torch threads): t5-small shapes (random weights), 2 LoRA adapters,
real jokes questions (short sources) and SQuAD v2 contexts (long sources).

  sampling: requests/s with temperature 0.8, top_p 0.95 against greedy, 1 and 32 closed-loop clients, each output
            forced to 32 tokens (min_new_tokens) so that both decode the same number of tokens
  beams:    8 clients, num_beams 4, 32 new tokens at most: requests/s against the path the engine had before, one
            generate(num_beams=4) call per input on the model thread; and a one-line greedy request sent while the
            8 beam requests run, against its time alone
  n:        n = 4 samples of one prompt in one request, against 4 separate requests sent at once (jokes, squad)

python benchmarks/decoding.py [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402


async def closed_loop(clients: int, requests: int, send) -> dict:
    """`clients` clients share `requests` calls of send(i); requests/s and latencies."""
    queue, latencies = list(range(requests)), []
    started = time.perf_counter()

    async def client():
        while queue:
            i = queue.pop()
            sent = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - sent)
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": requests, "seconds": elapsed, "requests_per_s": requests / elapsed,
            "p50_s": latencies[len(latencies) // 2], "p99_s": latencies[min(len(latencies) - 1,
                                                                            int(0.99 * len(latencies)))]}


async def sampling_case(engine, sources, names, clients: int, requests: int, tokens: int = 32) -> dict:
    from peft_t5.serve.decoding import Sampling

    out = {}
    for label, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=0.8, top_p=0.95, seed=0))):
        async def send(i, sampling=sampling):
            await engine.complete([names[i % 2]], [sources[i % len(sources)]], tokens, min_new_tokens=tokens,
                                  sampling=sampling)
        await closed_loop(clients, min(clients, 4), send)  # warm up
        out[label] = await closed_loop(clients, requests, send)
        print(f"sampling {clients:2d} clients {label:8s} {out[label]['requests_per_s']:.2f} req/s")
    out["ratio"] = out["sampled"]["requests_per_s"] / out["greedy"]["requests_per_s"]
    return out


async def beam_case(engine, bank, sources, names, requests: int, tokens: int = 32) -> dict:
    async def in_engine(i):
        return await engine.complete([names[i % 2]], [sources[i]], tokens, num_beams=4)

    async def through_generate(i):  # the engine's old path: one generate() per input, between two steps
        return await engine.on_model_thread(functools.partial(
            bank.generate_sources, [names[i % 2]], [sources[i]], max_new_tokens=tokens, num_beams=4))

    out, texts = {}, {}
    for label, send in (("generate_path", through_generate), ("engine", in_engine)):
        results = {}

        async def record(i, send=send, results=results):
            results[i] = await send(i)
        await closed_loop(8, 8, record)  # warm up
        results.clear()
        out[label] = await closed_loop(8, requests, record)
        texts[label] = [r[0].text if hasattr(r[0], "text") else r[0] for _, r in sorted(results.items())]
        print(f"beams 8 clients {label:14s} {out[label]['requests_per_s']:.2f} req/s")
    out["ratio"] = out["engine"]["requests_per_s"] / out["generate_path"]["requests_per_s"]
    out["outputs_equal"] = texts["engine"] == texts["generate_path"]

    async def small():
        sent = time.perf_counter()
        await engine.complete([names[0]], [sources[-1]], 16, min_new_tokens=16)
        return time.perf_counter() - sent
    async def beside(requests) -> float:
        running = [asyncio.ensure_future(r) for r in requests]
        await asyncio.sleep(0.5)
        during = await small()
        await asyncio.gather(*running)
        return during
    alone = min([await small() for _ in range(3)])
    during = await beside(in_engine(i) for i in range(8))
    # the same 32 rows without beams: 8 greedy requests of 4 inputs, as long as a beam request
    greedy = await beside(engine.complete([names[i % 2]] * 4, sources[4 * i:4 * i + 4], tokens, min_new_tokens=tokens)
                          for i in range(8))
    out["small_request"] = {"alone_s": alone, "during_8_beam_requests_s": during, "ratio": during / alone,
                            "during_8_greedy_requests_of_4_inputs_s": greedy, "greedy_ratio": greedy / alone}
    print(f"beams: a 16-token greedy request alone {alone:.3f} s, beside 8 beam requests {during:.3f} s, beside the "
          f"same rows greedy {greedy:.3f} s")
    return out


async def n_case(engine, sources, names, rounds: int, tokens: int = 32) -> dict:
    from peft_t5.serve.decoding import Sampling

    sampling = Sampling(temperature=0.8, top_p=0.95)
    out = {}

    async def one_request(i):
        await engine.complete([names[0]], [sources[i]], tokens, n=4, min_new_tokens=tokens, sampling=sampling)

    async def four_requests(i):
        await asyncio.gather(*(engine.complete([names[0]], [sources[i]], tokens, min_new_tokens=tokens,
                                               sampling=sampling) for _ in range(4)))
    for label, send in (("four_requests", four_requests), ("n_4", one_request)):
        await closed_loop(1, 2, send)
        out[label] = await closed_loop(1, rounds, send)
    out["ratio"] = out["four_requests"]["seconds"] / out["n_4"]["seconds"]
    return out


async def run_all(args, bank) -> dict:
    from peft_t5.serve.engine import Engine

    jokes, _ = jokes_records()
    squad, _ = squad_records(200)
    rng = random.Random(0)
    short = bank.sources("jokes_a", [r["question"] for r in rng.sample(jokes, 256)])
    long = bank.sources("jokes_a", [f"question: {r['question']} context: {r['context']}" for r in squad[:64]])
    names = ["jokes_a", "jokes_b"]
    engine = Engine(bank, max_rows=64, max_rows_per_request=8, threads=args.threads)
    engine.start()
    quick = args.quick
    try:
        results = {"sampling": {}, "n": {}}
        for clients, requests in ((1, 4 if quick else 12), (32, 32 if quick else 96)):
            results["sampling"][str(clients)] = await sampling_case(engine, short, names, clients, requests)
        results["beams"] = await beam_case(engine, bank, short, names, 8 if quick else 24)
        for shape, sources in (("jokes", short), ("squad", long)):
            results["n"][shape] = await n_case(engine, sources, names, 2 if quick else 6)
            print(f"n=4 {shape}: one request {results['n'][shape]['n_4']['seconds']:.2f} s, 4 requests "
                  f"{results['n'][shape]['four_requests']['seconds']:.2f} s ({results['n'][shape]['ratio']:.2f}x)")
        return results
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default="t5-small")
    parser.add_argument("--output", default="benchmarks/results/decoding.json")
    args = parser.parse_args()
    from peft_t5.bank import AdapterBank
    from peft_t5.serve.engine import model_thread_threads

    args.threads = model_thread_threads()
    with tempfile.TemporaryDirectory() as folder:
        base, adapters = make_adapters(Path(folder), args.config)
        bank = AdapterBank.load(base, adapters)
        results = asyncio.run(run_all(args, bank))
    summary = {"sampled_vs_greedy_at_1": results["sampling"]["1"]["ratio"],
               "sampled_vs_greedy_at_32": results["sampling"]["32"]["ratio"],
               "beams_engine_vs_generate_path": results["beams"]["ratio"],
               "small_request_beside_beams_vs_alone": results["beams"]["small_request"]["ratio"],
               "n4_vs_4_requests_jokes": results["n"]["jokes"]["ratio"],
               "n4_vs_4_requests_squad": results["n"]["squad"]["ratio"]}
    print({k: round(v, 2) for k, v in summary.items()})
    write_results({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": args.config,
                   "threads": args.threads, "summary": summary, **results}, args.output)


if __name__ == "__main__":
    main()
