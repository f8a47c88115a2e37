"""Serving throughput and latency: `peft-t5 serve` with 2 adapters, mixed-adapter requests from 1, 8, 32 clients.

The static batcher's modes, run from the last commit that had it (STATIC_FROM: one engine has served every method
since; that engine is measured in serve_engine.py). Three servers, side by side in one run (each its own process on
127.0.0.1, clients in this one):
  across: batching across requests and adapters (the default);
  none:   the same server, one request per generate call;
  switch: one request at a time, setting the active adapter per request (what a plain PeftModel loop does).
Each client sends one question a request to a seeded random adapter, waits for the answer, sends the next;
request counts and time are bounded, and every server is stopped at the end.

python benchmarks/serve_throughput.py [--quick] [--config tiny|t5-small|flan-t5-large] [--clients 1 8 32]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, ROOT, jokes_records, machine, write_results  # noqa: E402

MODES = ("across", "none", "switch")
STATIC_FROM = "07205b8"  # the last commit with the static batcher (`--engine static`), the baseline it measures


@contextlib.contextmanager
def checkout(rev: str):
    """A temporary git worktree of this repository at `rev`, to run an earlier server from."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "worktree", "add", "--detach", "-q", tmp + "/src", rev], cwd=ROOT, check=True)
        try:
            yield tmp + "/src"
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tmp + "/src"], cwd=ROOT)


def make_base(folder: Path, config: str) -> str:
    """tiny, or a random-weight model from benchmarks/configs saved under folder/base (with the tiny tokenizer)."""
    from peft_t5.modeling import TINY, tiny_tokenizer

    if config == TINY:
        return TINY
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(CONFIGS / f"{config}.json"))
    with torch.no_grad():  # padding and the tokens the tiny tokenizer lacks get zero weights: random weights
        for weight in (model.shared.weight, model.lm_head.weight):  # then decode to text, which streams
            weight[len(tiny_tokenizer()):] = 0
            weight[model.config.pad_token_id] = 0
    base = str(folder / "base")
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    return base


def make_adapters(folder: Path, config: str) -> tuple[str, dict[str, str]]:
    """A base (make_base) and 2 jokes adapters with random LoRA."""
    from peft_t5.adapters import save_adapter
    from peft_t5.modeling import add_lora, load_base_model, tiny_tokenizer
    from peft_t5.tasks import get_task

    base = make_base(folder, config)
    task, adapters = get_task("jokes"), {}
    for seed, name in enumerate(["jokes_a", "jokes_b"]):
        torch.manual_seed(seed)
        model = add_lora(load_base_model(base), dropout=0.0)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.02)
        meta = {"task": task.name, "base_model": base, "template": task.template, "max_source_length": 512}
        save_adapter(model, tiny_tokenizer(), folder / name, meta, "benchmark adapter")
        adapters[name] = str(folder / name)
    return base, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, adapters: dict[str, str], extra: tuple[str, ...] = (), source: str | None = None,
                 mode: str = "engine") -> tuple[subprocess.Popen, str]:
    """`peft-t5 serve` with these adapters and flags, from this checkout or from `source` (another checkout)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "peft_t5", "serve", "--model", base, "--port", str(port), *extra,
           *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": source} if source else {})}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=source)  # there, `-m peft_t5` finds that checkout's package first
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server ({mode}) exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server ({mode}) did not start in 300 s")


async def load(url: str, clients: int, requests: int, seconds: float, questions: list[str], names: list[str],
               max_new_tokens: int | tuple[int, int]) -> dict:
    """`clients` closed-loop clients share `requests` requests; sending stops after `seconds`. max_new_tokens: a
    number, or a (low, high) range each request draws its forced output length from."""
    import httpx

    rng = random.Random(0)
    plan = [(rng.choice(names), rng.choice(questions),
             rng.randint(*max_new_tokens) if isinstance(max_new_tokens, tuple) else None) for _ in range(requests)]
    latencies, failures = [], 0
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient):
        nonlocal failures
        while plan and time.perf_counter() - started < seconds:
            adapter, question, forced = plan.pop()
            length = {"max_new_tokens": forced, "min_new_tokens": forced} if forced else {"max_new_tokens":
                                                                                         max_new_tokens}
            sent = time.perf_counter()
            reply = await http.post(url + "/v1/generate", json={"adapter": adapter, "inputs": [question], **length},
                                    timeout=seconds)
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None  # noqa: E731
    return {"requests": len(latencies), "failures": failures, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_s": pick(0.5), "p99_s": pick(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests (CI-sized machines)")
    parser.add_argument("--config", default="tiny", help="tiny, or a config in benchmarks/configs (t5-small, flan-t5-large)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, help="Requests per cell (default: 8 x clients, at least 32; quick: half)")
    parser.add_argument("--seconds", type=float, default=60.0, help="Longest a cell sends for (default 60)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--output", default="benchmarks/results/serve_throughput.json")
    args = parser.parse_args()
    questions = [r["question"] for r in jokes_records()[0][:2000]]
    results = {"machine": machine(), "config": args.config, "max_new_tokens": args.max_new_tokens,
               "max_wait_ms": args.max_wait_ms, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp, checkout(STATIC_FROM) as static:
        base, adapters = make_adapters(Path(tmp), args.config)
        for mode in MODES:
            process, url = start_server(base, adapters, ("--engine", "static", "--batching", mode, "--max_wait_ms",
                                                         str(args.max_wait_ms)), static, mode)
            try:
                for clients in args.clients:
                    count = args.requests or max(32, 8 * clients) // (2 if args.quick else 1)
                    cell = asyncio.run(load(url, clients, count, args.seconds, questions, list(adapters),
                                            args.max_new_tokens))
                    results["modes"].setdefault(mode, {})[str(clients)] = cell
                    print(f"{mode:7s} {clients:3d} clients: {cell['requests_per_s']:7.1f} req/s  "
                          f"p50 {1000 * cell['p50_s']:7.1f} ms  p99 {1000 * cell['p99_s']:7.1f} ms  "
                          f"({cell['requests']} requests, {cell['failures']} failed)", flush=True)
            finally:
                process.terminate()
                process.wait(30)
    top = str(max(args.clients))
    across, alone = results["modes"]["across"][top], results["modes"]["none"][top]
    results["ratios"] = {f"across_vs_none_requests_per_s_at_{top}": across["requests_per_s"] / alone["requests_per_s"],
                         f"across_vs_switch_requests_per_s_at_{top}":
                             across["requests_per_s"] / results["modes"]["switch"][top]["requests_per_s"],
                         f"across_vs_none_p99_at_{top}": across["p99_s"] / alone["p99_s"]}
    print({k: round(v, 2) for k, v in results["ratios"].items()})
    labels = [f"{m} x{c}" for m in MODES for c in args.clients]
    values = [results["modes"][m][str(c)]["requests_per_s"] for m in MODES for c in args.clients]
    write_results(results, args.output, (f"serving {args.config}: requests/s by mode and clients", labels, values,
                                         "requests/s"))


if __name__ == "__main__":
    main()
