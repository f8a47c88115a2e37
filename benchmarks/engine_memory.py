"""Where a serving process's memory goes, phase by phase: the engine (2 LoRA adapters unmerged; compiled, the
default, and --compile off; float32 and int8) against CTranslate2 (the merged adapter, tokenised with `tokenizers`),
each in a fresh process, on the work of serve_startup.py: one short prompt, then 32 SQuAD prompts at once (sources
cut to 512 tokens), 32 new tokens, 2 threads, t5-small shapes with random weights. After each phase the process's
RSS, split as the kernel counts it: anonymous memory (what it allocated) and file pages (the mapped safetensors the
weights are read from, and its libraries' code), and the phase's peak (VmHWM, reset between phases). The engine's
phases: serve's imports, the model loaded (and quantized), the engine started with its graphs compiled (the compile
cache warm, as at a restart), the first answer, the 32 rows, and idle (once the engine has let go of the caches the
rows grew, IDLE_RELEASE_S later); CTranslate2's the same without the compile (it frees its caches after a batch).

python benchmarks/engine_memory.py [--output benchmarks/results/engine_memory.json] [--cache DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (common imports torch: not in CTranslate2's process)
TOKENS, ROWS, THREADS, SOURCE_LIMIT = 32, 32, 2, 512
SYSTEMS = ("engine_float32", "engine_eager_float32", "ct2_float32", "engine_int8", "engine_eager_int8", "ct2_int8")


class Phases:
    """RSS after each phase and the phase's peak, read from /proc/self/status (MiB)."""

    def __init__(self):
        self.found: list[dict] = []

    def __call__(self, name: str) -> None:
        status = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in open("/proc/self/status")
                  if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM"))}
        self.found.append({"phase": name, "rss": status["VmRSS"], "anon": status["RssAnon"],
                           "file": status["RssFile"], "peak": status["VmHWM"]})
        with open("/proc/self/clear_refs", "w") as f:  # the next phase's peak starts from here
            f.write("5")


def engine_child(system: str, work: dict, phases: Phases) -> None:
    for unused in ("scipy", "boto3", "bitsandbytes"):  # as serve() does
        sys.modules.setdefault(unused, None)
    import uvicorn  # noqa: F401  serve's imports

    from peft_t5.bank import AdapterBank
    from peft_t5.serve.app import create_app  # noqa: F401

    phases("imports")
    import torch

    from peft_t5.quantize import quantize_int8
    from peft_t5.serve.engine import IDLE_RELEASE_S, Engine

    torch.set_num_threads(1)  # this thread's; the engine's model thread gets THREADS
    bank = AdapterBank.load(work["base"], work["adapters"])
    if system.endswith("int8"):
        quantize_int8(*bank.models())
    phases("model loaded")
    engine, call = started_engine(Engine(bank, max_rows=ROWS, max_rows_per_request=ROWS, threads=THREADS,
                                         compile="eager" not in system, compile_cache=work["cache"]))
    phases("engine ready")
    names = list(work["adapters"])
    call(engine.generate(names[:1], [work["first"]], TOKENS, min_new_tokens=TOKENS))
    phases("first answer")
    call(engine.generate([names[i % 2] for i in range(ROWS)], work["many"], TOKENS, min_new_tokens=TOKENS))
    phases(f"{ROWS} SQuAD rows")
    engine.wait_until(lambda: not engine.busy and not engine._grown(), timeout=120)
    phases(f"idle ({IDLE_RELEASE_S:g} s)")
    call(engine.stop())


def started_engine(engine):
    """The engine started on an event loop of its own thread, its graphs compiled; and call(coroutine) -> its result."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    async def start():
        engine.start()

    call(start())
    engine.wait_compiled()
    return engine, call


def ct2_child(system: str, work: dict, phases: Phases) -> None:
    import ctranslate2
    import tokenizers

    phases("imports")
    folder = work[system]
    tokenizer = tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")
    tokenizer.enable_truncation(SOURCE_LIMIT)
    translator = ctranslate2.Translator(folder, device="cpu", intra_threads=THREADS)
    phases("model loaded")

    def answer(sources):
        translator.translate_batch([tokenizer.encode(s).tokens for s in sources], max_batch_size=ROWS, beam_size=1,
                                   max_decoding_length=TOKENS, min_decoding_length=TOKENS)

    answer([work["first"]])
    phases("first answer")
    answer(work["many"])
    phases(f"{ROWS} SQuAD rows")


def run_child(system: str, work_file: str, script: str = __file__) -> list[dict]:
    """What `script --child system --work work_file` printed last, as JSON: one system in a process of its own."""
    process = subprocess.run([sys.executable, script, "--child", system, "--work", work_file], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"})
    if process.returncode:
        raise RuntimeError(f"{system} failed: {process.stderr[-2000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def prepare(folder: Path, cache: str) -> dict:
    from common import jokes_records, merged_ct2, squad_records
    from serve_throughput import make_adapters

    from peft_t5.tasks import get_task

    base, adapters = make_adapters(folder, "t5-small")
    converted = merged_ct2(folder, base, adapters["jokes_a"])
    return {"base": base, "adapters": adapters, "cache": cache,
            "first": get_task("jokes").template.format(**jokes_records()[0][0]),
            "many": [get_task("squad").template.format(**r) for r in squad_records(ROWS)[0]],
            **{f"ct2_{quantization}": path for quantization, path in converted.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/engine_memory.json")
    parser.add_argument("--cache", help="The engine's compile cache (default: one of this run's own, filled first)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phases = Phases()
        work = json.loads(Path(args.work).read_text())
        (ct2_child if args.child.startswith("ct2") else engine_child)(args.child, work, phases)
        print(json.dumps(phases.found), flush=True)
        return
    from common import machine, squad_records, write_results

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": ROWS, "tokens": TOKENS,
               "threads": THREADS, "data": squad_records(1)[1], "units": "MiB", "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(Path(tmp), args.cache or f"{tmp}/inductor")
        work_file = f"{tmp}/work.json"
        Path(work_file).write_text(json.dumps(work))
        for system in ("engine_float32", "engine_int8"):  # the compile cache filled (its figures not kept)
            run_child(system, work_file)
        for system in SYSTEMS:
            results["systems"][system] = run_child(system, work_file)
            print(system, json.dumps(results["systems"][system]), flush=True)
    peak = {system: max(p["peak"] for p in found) for system, found in results["systems"].items()}
    last = {system: found[-1] for system, found in results["systems"].items()}
    results["peak"] = peak
    results["ratios"] = {  # the engine over CTranslate2 of the same precision (higher: the engine holds more)
        f"{system}_{key}": value / reference for system in SYSTEMS if system.startswith("engine")
        for ct2 in [f"ct2_{system.rsplit('_', 1)[1]}"]
        for key, value, reference in (("peak", peak[system], peak[ct2]),
                                      ("anon_after", last[system]["anon"], last[ct2]["anon"]))}
    print(json.dumps({"peak": peak, "ratios": {k: round(v, 2) for k, v in results["ratios"].items()}}, indent=1))
    write_results(results, args.output)


if __name__ == "__main__":
    main()
