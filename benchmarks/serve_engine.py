"""The continuous engine against the static batcher, each a real `peft-t5 serve` process on 127.0.0.1, side by side
in one run: t5-small shapes (random weights), 2 LoRA adapters, real jokes and SQuAD v2 prompts.

  load:     32 closed-loop clients, each request to a random adapter with an output length drawn from 4..64 tokens
            (forced with min_new_tokens): requests/s, p50, p99
  hostile:  a maximal legal request (32 inputs of 20,000 characters, 256 tokens), and 2 s later a one-line request:
            the small request's latency next to its latency alone
  ttft:     1 client streaming: time to the first piece, next to one encoder pass + one decoder step (in-process)
  memory:   the server's peak RSS under the load, next to CTranslate2's (int8 and float32, one merged adapter,
            the same prompts at batch 32)

Request counts and time are bounded; every server is stopped at the end.
python benchmarks/serve_engine.py [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_throughput import STATIC_FROM, checkout, load, make_adapters, start_server  # noqa: E402

ENGINES = {"continuous": (), "static": ("--engine", "static", "--max_wait_ms", "5.0")}  # static: from STATIC_FROM


class PeakRss:
    def __init__(self, pid: int):
        self.process, self.peak, self.stop = psutil.Process(pid), 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def small_request(url: str, question: str) -> float:
    sent = time.perf_counter()
    reply = httpx.post(url + "/v1/generate", json={"adapter": "jokes_a", "inputs": [question], "max_new_tokens": 16,
                                                  "min_new_tokens": 16}, timeout=900)
    assert reply.status_code == 200, reply.text
    return time.perf_counter() - sent


def hostile(url: str, big_inputs: list[str], question: str) -> dict:
    alone = min(small_request(url, question) for _ in range(3))
    big = threading.Thread(target=lambda: httpx.post(url + "/v1/generate", timeout=900, json={
        "adapter": "jokes_b", "inputs": big_inputs, "max_new_tokens": 256, "min_new_tokens": 256}))
    started = time.perf_counter()
    big.start()
    time.sleep(2)
    during = small_request(url, question)
    big.join()
    return {"small_alone_s": alone, "small_during_big_s": during, "ratio": during / alone,
            "big_request_s": time.perf_counter() - started}


def first_piece(http: httpx.Client, url: str, question: str) -> float:
    """On an open connection, as a client streaming tokens has (a new httpx client costs ~20 ms of its own)."""
    sent = time.perf_counter()
    with http.stream("POST", url + "/v1/generate", timeout=60, json={
            "adapter": "jokes_a", "inputs": [question], "max_new_tokens": 16, "min_new_tokens": 16,
            "stream": True}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and "piece" in json.loads(line[6:]):
                return time.perf_counter() - sent
    raise RuntimeError("no piece streamed")


def encoder_and_step(base: str, adapters: dict[str, str], question: str) -> float:
    """One encoder pass + one decoder step for the same question, as the engine runs them (best of 5)."""
    import torch

    from peft_t5.bank import AdapterBank
    from peft_t5.serve.t5_runner import T5Runner

    bank = AdapterBank.load(base, adapters)
    runner = T5Runner(bank.model)  # the eager step: a server's first requests run it while its graphs compile
    ids, name = bank.tokenizer(question).input_ids, bank.peft_name("jokes_a")
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        runner.add([ids], [name], budgets=[1])
        runner.step(torch.zeros(1, dtype=torch.long)).argmax(-1)
        best = min(best, time.perf_counter() - started)
        runner.remove(0)
    return best


CT2_RSS = """
import ctranslate2, json, resource, sys
from transformers import AutoTokenizer
folder, quantization = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder + "/merged")
translator = ctranslate2.Translator(folder + "/ct2-" + quantization, device="cpu")
sources = json.load(open(folder + "/questions.json"))
pieces = [tokenizer.convert_ids_to_tokens(tokenizer(s).input_ids) for s in sources]
translator.translate_batch(pieces, max_batch_size=32, beam_size=1, max_decoding_length=64, min_decoding_length=4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def ct2_peak_rss(tmp: Path, base: str, adapter: str, questions: list[str]) -> dict:
    import ctranslate2
    from peft import PeftModel

    from peft_t5.modeling import load_base_model

    merged = PeftModel.from_pretrained(load_base_model(base), adapter).merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    from peft_t5.modeling import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp / "merged")
    (tmp / "questions.json").write_text(json.dumps(questions))
    peaks = {}
    for quantization in ("float32", "int8"):
        ctranslate2.converters.TransformersConverter(str(tmp / "merged")).convert(
            str(tmp / f"ct2-{quantization}"), quantization=quantization, force=True)
        out = subprocess.run([sys.executable, "-c", CT2_RSS, str(tmp), quantization], capture_output=True, text=True,
                             check=True)
        peaks[f"ct2_{quantization}"] = int(out.stdout.strip().splitlines()[-1])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=240.0, help="Longest the load cell sends for")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--max_rows_per_request", type=int, default=8, help="The continuous server's setting")
    parser.add_argument("--output", default="benchmarks/results/serve_engine.json")
    args = parser.parse_args()
    questions = [r["question"] for r in jokes_records()[0][:2000]]
    contexts = [r["context"] for r in squad_records(400)[0]]
    big = []
    for i in range(32):  # 20,000 characters of real SQuAD contexts each
        text = ""
        while len(text) < 20_000:
            text += contexts[(i * 37 + len(text)) % len(contexts)] + " "
        big.append(text[:20_000])
    requests = args.clients * (4 if args.quick else 8)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": "t5-small", "clients": args.clients,
               "requests": requests, "output_tokens": "4..64, forced", "engines": {}}
    with tempfile.TemporaryDirectory() as tmp, checkout(STATIC_FROM) as static:
        base, adapters = make_adapters(Path(tmp), "t5-small")
        for engine in args.engines:
            flags = ENGINES[engine] + (("--max_rows_per_request", str(args.max_rows_per_request))
                                       if engine == "continuous" else ())
            process, url = start_server(base, adapters, flags, static if engine == "static" else None, engine)
            try:
                cell = {}
                with PeakRss(process.pid) as rss:
                    cell["load"] = asyncio.run(load(url, args.clients, requests, args.seconds, questions,
                                                    list(adapters), (4, 64)))
                cell["peak_rss_bytes"] = rss.peak
                print(engine, "load", json.dumps(cell["load"]), flush=True)
                cell["hostile"] = hostile(url, big, questions[0])
                with httpx.Client() as http:
                    http.get(url + "/health")
                    cell["first_piece_s"] = min(first_piece(http, url, questions[1]) for _ in range(5))
                results["engines"][engine] = cell
                print(engine, json.dumps(cell), flush=True)
            finally:
                process.terminate()
                process.wait(30)
        results["encoder_and_step_s"] = encoder_and_step(base, adapters, questions[1])
        results["peak_rss_bytes"] = {"server_" + e: c["peak_rss_bytes"] for e, c in results["engines"].items()}
        results["peak_rss_bytes"].update(ct2_peak_rss(Path(tmp), base, adapters["jokes_a"], questions[:requests]))
    results["max_rows_per_request"] = args.max_rows_per_request
    if set(results["engines"]) != set(ENGINES):
        write_results(results, args.output)
        return
    cont, static = results["engines"]["continuous"], results["engines"]["static"]
    results["ratios"] = {
        "requests_per_s_continuous_vs_static": cont["load"]["requests_per_s"] / static["load"]["requests_per_s"],
        "p99_continuous_vs_static": cont["load"]["p99_s"] / static["load"]["p99_s"],
        "small_during_big_vs_alone_continuous": cont["hostile"]["ratio"],
        "small_during_big_vs_alone_static": static["hostile"]["ratio"],
        "first_piece_minus_encoder_and_step_ms": 1000 * (cont["first_piece_s"] - results["encoder_and_step_s"]),
    }
    print({k: round(v, 2) for k, v in results["ratios"].items()})
    write_results(results, args.output, (f"{args.clients} clients, 4..64 tokens: requests/s", list(ENGINES),
                                         [results["engines"][e]["load"]["requests_per_s"] for e in ENGINES],
                                         "requests/s"))


if __name__ == "__main__":
    main()
