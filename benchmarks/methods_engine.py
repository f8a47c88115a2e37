"""One engine for every method, and adapters on demand: real `peft-t5 serve` processes on 127.0.0.1, t5-small
shapes (random weights), real jokes questions, each case against its baseline in the same run.

  methods:   one adapter of each of the six methods on one base, 32 closed-loop clients spread over them (output
             lengths 4..64, forced): requests/s and p99 of the engine against the static batcher it replaced
             (run from STATIC_FROM, the last commit that had it); and a one-line LoRA request sent while a maximal
             IA3 request (32 long inputs, 256 tokens) runs, against its time alone
  on demand: 200 LoRA adapters (r 8) on disk, --max_loaded_adapters 16, 32 clients choosing adapters with Zipf(1.1)
             popularity: requests/s, p99, cold loads, evictions and peak RSS against the same load over 16 adapters
             all loaded at start

Request counts and time are bounded; every server is stopped at the end.
python benchmarks/methods_engine.py [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_engine import PeakRss  # noqa: E402
from serve_throughput import STATIC_FROM, checkout, load, make_base, start_server  # noqa: E402


def method_adapters(folder: Path, base: str) -> dict[str, str]:
    """One adapter per method on the base, its trainable weights moved off their start."""
    from peft_t5.adapters import save_adapter
    from peft_t5.methods import METHODS
    from peft_t5.modeling import add_adapter, load_base_model, tiny_tokenizer

    adapters = {}
    for seed, (name, method) in enumerate(METHODS.items()):
        torch.manual_seed(seed)
        model = add_adapter(load_base_model(base), method.build(method.settings({}), 100))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        save_adapter(model, tiny_tokenizer(), folder / name, {"task": "jokes", "base_model": base, "method": name,
                                                              "template": "{question}", "max_source_length": 512},
                     "benchmark adapter")
        adapters[name] = str(folder / name)
    return adapters


def many_lora(folder: Path, base: str, count: int) -> list[str]:
    """`count` LoRA adapters (r 8): one saved by the toolkit, the rest its copies with their own random weights."""
    from safetensors.torch import load_file, save_file

    from peft_t5.adapters import save_adapter
    from peft_t5.methods import METHODS
    from peft_t5.modeling import add_adapter, load_base_model, tiny_tokenizer

    method = METHODS["lora"]
    model = add_adapter(load_base_model(base), method.build(method.settings({"lora_r": 8}), 100))
    first = folder / "lora000"
    save_adapter(model, tiny_tokenizer(), first, {"task": "jokes", "base_model": base, "template": "{question}",
                                                  "max_source_length": 512}, "benchmark adapter")
    weights = load_file(first / "adapter_model.safetensors")
    names = ["lora000"]
    for i in range(1, count):
        name = f"lora{i:03d}"
        shutil.copytree(first, folder / name)
        torch.manual_seed(i)
        save_file({k: torch.randn_like(v) * 0.02 for k, v in weights.items()},
                  str(folder / name / "adapter_model.safetensors"))
        names.append(name)
    return names


def small_beside_big(url: str, small: str, big: str, question: str, long_inputs: list[str]) -> dict:
    def small_request() -> float:
        sent = time.perf_counter()
        reply = httpx.post(url + "/v1/generate", timeout=900, json={
            "adapter": small, "inputs": [question], "max_new_tokens": 16, "min_new_tokens": 16})
        assert reply.status_code == 200, reply.text
        return time.perf_counter() - sent

    alone = min(small_request() for _ in range(3))
    worker = threading.Thread(target=lambda: httpx.post(url + "/v1/generate", timeout=900, json={
        "adapter": big, "inputs": long_inputs, "max_new_tokens": 256, "min_new_tokens": 256}))
    worker.start()
    time.sleep(2)
    during = small_request()
    worker.join()
    return {"alone_s": alone, "during_s": during, "ratio": during / alone}


def zipf_names(names: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    return rng.choices(names, weights=weights, k=count)


async def zipf_load(url: str, clients: int, plan: list[tuple[str, str]], seconds: float) -> dict:
    latencies, failures, started = [], 0, time.perf_counter()

    async def client(http):
        nonlocal failures
        while plan and time.perf_counter() - started < seconds:
            adapter, question = plan.pop()
            sent = time.perf_counter()
            reply = await http.post(url + "/v1/generate", timeout=seconds, json={
                "adapter": adapter, "inputs": [question], "max_new_tokens": 16, "min_new_tokens": 16})
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed, latencies = time.perf_counter() - started, sorted(latencies)
    return {"requests": len(latencies), "failures": failures, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_s": latencies[len(latencies) // 2],
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def scraped(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)", text, re.M)[1])  # noqa: E731
    return {"loads": value("peft_t5_adapter_load_seconds_count"),
            "load_seconds": value("peft_t5_adapter_load_seconds_sum"),
            "evictions": value("peft_t5_adapter_evictions_total")}


def stopped(process) -> None:
    process.terminate()
    process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300.0, help="Longest a load sends for")
    parser.add_argument("--only", choices=["methods", "on_demand"], help="Run one part (the other's results are kept "
                                                                          "from --output)")
    parser.add_argument("--output", default="benchmarks/results/methods_engine.json")
    args = parser.parse_args()
    questions = [r["question"] for r in jokes_records()[0][:2000]]
    contexts = [r["context"] for r in squad_records(200)[0]]
    long_inputs = [(" ".join(contexts[i:i + 40]))[:20_000] for i in range(32)]
    requests = args.clients * (2 if args.quick else 6)
    kept = json.loads(Path(args.output).read_text()) if args.only and Path(args.output).exists() else {}
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": "t5-small",
               "clients": args.clients, "static_from": STATIC_FROM, "methods": kept.get("methods", {}),
               "on_demand": kept.get("on_demand", {})}
    with tempfile.TemporaryDirectory() as tmp, checkout(STATIC_FROM) as static:
        folder = Path(tmp)
        base = make_base(folder, "t5-small")
        adapters = method_adapters(folder / "methods", base)
        for engine, flags, source in (("engine", (), None),
                                      ("static", ("--engine", "static", "--max_wait_ms", "5.0"), static)):
            if args.only == "on_demand":
                break
            process, url = start_server(base, adapters, flags, source, engine)
            try:
                cell = {"load": asyncio.run(load(url, args.clients, requests, args.seconds, questions,
                                                 list(adapters), (4, 64)))}
                cell["small_lora_beside_big_ia3"] = small_beside_big(url, "lora", "ia3", questions[0], long_inputs)
                results["methods"][engine] = cell
                print(engine, json.dumps(cell), flush=True)
            finally:
                stopped(process)
        if args.only == "methods":
            write_results(results, args.output)
            return
        names = many_lora(folder / "many", base, 200)
        plan = list(zip(zipf_names(names, requests), random.Random(1).choices(questions, k=requests)))
        preloaded = names[:16]
        hot_plan = list(zip(zipf_names(preloaded, requests), random.Random(1).choices(questions, k=requests)))
        for label, start, flags, work in (
                ("on_demand", {"lora000": str(folder / "many" / "lora000")},
                 ("--adapter_root", str(folder / "many"), "--max_loaded_adapters", "16"), plan),
                ("preloaded_16", {n: str(folder / "many" / n) for n in preloaded}, (), hot_plan)):
            process, url = start_server(base, start, flags, None, label)
            try:
                with PeakRss(process.pid) as rss:
                    cell = asyncio.run(zipf_load(url, args.clients, list(work), args.seconds))
                cell.update(scraped(url), peak_rss_bytes=rss.peak,
                            distinct_adapters_asked=len({a for a, _ in work}))
                results["on_demand"][label] = cell
                print(label, json.dumps(cell), flush=True)
            finally:
                stopped(process)
    m, d = results["methods"], results["on_demand"]
    results["ratios"] = {
        "requests_per_s_engine_vs_static": m["engine"]["load"]["requests_per_s"] / m["static"]["load"]["requests_per_s"],
        "p99_engine_vs_static": m["engine"]["load"]["p99_s"] / m["static"]["load"]["p99_s"],
        "small_lora_beside_big_ia3_engine": m["engine"]["small_lora_beside_big_ia3"]["ratio"],
        "small_lora_beside_big_ia3_static": m["static"]["small_lora_beside_big_ia3"]["ratio"],
        "on_demand_vs_preloaded_requests_per_s": d["on_demand"]["requests_per_s"] / d["preloaded_16"]["requests_per_s"],
        "on_demand_vs_preloaded_p99": d["on_demand"]["p99_s"] / d["preloaded_16"]["p99_s"],
        "on_demand_vs_preloaded_peak_rss": d["on_demand"]["peak_rss_bytes"] / d["preloaded_16"]["peak_rss_bytes"],
        "cold_load_s_per_adapter": d["on_demand"]["load_seconds"] / max(1.0, d["on_demand"]["loads"]),
    }
    print({k: round(v, 3) for k, v in results["ratios"].items()})
    write_results(results, args.output)


if __name__ == "__main__":
    main()
