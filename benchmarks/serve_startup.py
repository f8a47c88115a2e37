"""Start-up and peak memory of a serving process: `peft-t5 serve` (the engine, 2 LoRA adapters unmerged) against a
CTranslate2 process (the merged adapter, tokenised with the `tokenizers` package as a lean CTranslate2 deployment
does), each launched fresh, on the same work. Start-up: seconds from launch to the answer of one short prompt.
Peak RSS (the kernel's VmHWM): after that answer, and after 32 SQuAD prompts decoded at once. t5-small shapes, random
weights, 32 new tokens, float32 and int8 (serve --quantize int8; CTranslate2 converted with int8), 2 threads each;
sources cut to 512 tokens in both (the adapters' max_source_length). Each system's runtime floor, the peak RSS of a
process that only imports what its server imports, is measured too, and the peaks compared above it.

The engine compiles its decoder step and encoder (serve --compile on, the default) into a compile cache of this run's
own: a first launch per precision fills it (its seconds to the four graphs compiled, decoder step and encoder, one
row and many: the cold compile time), then every timed launch finds it warm. A timed launch answers the short prompt
(eagerly, while the graphs compile), waits until /metrics says all four are compiled (seconds from launch:
compiled_s), then decodes the 32 SQuAD rows compiled.
engine_eager is the same server with --compile off, the server as it was before the step was compiled.

python benchmarks/serve_startup.py [--rounds 3] [--output benchmarks/results/serve_startup.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, merged_ct2, squad_records, write_results  # noqa: E402
from serve_throughput import free_port, make_adapters  # noqa: E402

TOKENS, ROWS, THREADS, SOURCE_LIMIT = 32, 32, 2, 512

CT2_PROCESS = """
import json, sys
import ctranslate2, tokenizers
folder, first, many = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")
tokenizer.enable_truncation(%d)  # as the engine truncates (the adapters' max_source_length)
translator = ctranslate2.Translator(folder, device="cpu", intra_threads=%d)
def answer(sources):
    pieces = [tokenizer.encode(s).tokens for s in sources]
    results = translator.translate_batch(pieces, max_batch_size=%d, beam_size=1, max_decoding_length=%d,
                                         min_decoding_length=%d)
    return [tokenizer.decode([tokenizer.token_to_id(t) for t in r.hypotheses[0]]) for r in results]
answer(first)
print("answered", flush=True)
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
first_peak = peak()
answer(many)
print(json.dumps({"peak_rss_first": first_peak, "peak_rss_many": peak()}), flush=True)
""" % (SOURCE_LIMIT, THREADS, ROWS, TOKENS, TOKENS)


# What each process holds before any model: serve's imports (as serve() makes them) and CTranslate2's
FLOORS = {"engine": "import sys\nfor unused in ('scipy', 'boto3', 'bitsandbytes'):\n    sys.modules.setdefault(unused, "
                    "None)\nimport uvicorn\nfrom peft_t5.bank import AdapterBank\nfrom peft_t5.serve.app import create_app",
          "ct2": "import ctranslate2, tokenizers"}


def runtime_floor(system: str) -> int:
    """Peak RSS of a process that only imports what `system`'s server imports before loading a model."""
    code = FLOORS[system] + "\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS)}).stdout.split()[-1]) * 1024


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024


def compiled_graphs(port: int) -> int:
    """How many of the decoder step's and the encoder's graphs /metrics says are compiled (-1: one failed)."""
    import httpx

    lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines()
    values = [float(line.split()[-1]) for line in lines if line.startswith(("peft_t5_step_compiled{",
                                                                                   "peft_t5_encoder_compiled{"))]
    return -1 if any(v < 0 for v in values) else int(sum(values))


def engine_round(base: str, adapters: dict[str, str], first: str, many: list[str], int8: bool,
                 cache: str | None) -> dict:
    """cache: the compile cache (None: --compile off)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "peft_t5", "serve", "--model", base, "--port", str(port),
           "--max_rows_per_request", str(ROWS), *(["--quantize", "int8"] if int8 else []),
           *(["--compile_cache", cache] if cache else ["--compile", "off"]),
           *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url, names = f"http://127.0.0.1:{port}/v1/generate", list(adapters)
    try:
        while True:  # the port is bound before the model loads: a request waits in its backlog until then
            try:
                reply = httpx.post(url, json={"adapter": names[0], "inputs": [first], "max_new_tokens": TOKENS,
                                              "min_new_tokens": TOKENS}, timeout=120)
                break
            except httpx.ConnectError:
                if process.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError("peft-t5 serve did not start")
                time.sleep(0.02)
        startup = time.perf_counter() - started
        reply.raise_for_status()
        peak_first = vm_hwm(process.pid)
        compiled = None
        while cache:  # the four graphs (step, encoder; one row, many rows), polled for at most 10 minutes
            ready = compiled_graphs(port)
            if ready < 0 or time.perf_counter() - started > 600:
                raise RuntimeError("the decoder step or the encoder did not compile")
            if ready == 4:
                compiled = time.perf_counter() - started
                break
            time.sleep(0.5)
        with httpx.Client(timeout=300) as client:  # 32 rows, half on each adapter: two requests at once
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda k: client.post(url, json={
                    "adapter": names[k], "inputs": many[k::2], "max_new_tokens": TOKENS,
                    "min_new_tokens": TOKENS}), range(2)))
        for r in replies:
            r.raise_for_status()
        return {"startup_s": startup, "compiled_s": compiled, "peak_rss_first": peak_first,
                "peak_rss_many": vm_hwm(process.pid)}
    finally:
        process.terminate()
        process.wait(30)


def ct2_round(folder: str, first: str, many: list[str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CT2_PROCESS, folder, json.dumps([first]), json.dumps(many)],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    assert process.stdout.readline().strip() == "answered", "the CTranslate2 process failed"
    startup = time.perf_counter() - started
    peaks = json.loads(process.stdout.readline())
    process.wait(60)
    return {"startup_s": startup, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Fresh launches of each system (the median is kept)")
    parser.add_argument("--output", default="benchmarks/results/serve_startup.json")
    args = parser.parse_args()

    from peft_t5.tasks import get_task

    first = get_task("jokes").template.format(**jokes_records()[0][0])
    squad, data = squad_records(ROWS)
    many = [get_task("squad").template.format(**r) for r in squad]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "data": data, "tokens": TOKENS,
               "rows": ROWS, "threads": THREADS, "rounds": args.rounds, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_adapters(Path(tmp), "t5-small")
        converted = merged_ct2(Path(tmp), base, adapters["jokes_a"])
        cache = f"{tmp}/inductor"
        for quantization in ("float32", "int8"):  # the cache filled: the cold compile
            cold = engine_round(base, adapters, first, many, quantization == "int8", cache)
            results[f"cold_compiled_s_{quantization}"] = cold["compiled_s"]
            print("cold compile", quantization, round(cold["compiled_s"], 1), "s from launch", flush=True)
        for _ in range(args.rounds):  # alternating, so that a busy moment hits every system
            for quantization in ("float32", "int8"):
                int8 = quantization == "int8"
                for system, run in (("engine", lambda: engine_round(base, adapters, first, many, int8, cache)),
                                    ("engine_eager", lambda: engine_round(base, adapters, first, many, int8, None)),
                                    ("ct2", lambda: ct2_round(converted[quantization], first, many))):
                    found = run()
                    results["runs"].setdefault(f"{system}_{quantization}", []).append(found)
                    print(system, quantization, {k: round(v / 2**20) if "rss" in k else v and round(v, 2)
                                                 for k, v in found.items()}, flush=True)
    median = {name: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0] if runs[0][key] is not None}
              for name, runs in results["runs"].items()}
    results["median"] = median
    results["ratios"] = {  # engine over CTranslate2 (higher: the engine needs more)
        f"{system}_{key}_{q}": median[f"{system}_{q}"][key] / median[f"ct2_{q}"][key] for system in
        ("engine", "engine_eager") for q in ("float32", "int8") for key in ("startup_s", "peak_rss_first",
                                                                           "peak_rss_many")}
    floors = {system: runtime_floor(system) for system in FLOORS}
    results["runtime_floor_rss"] = floors
    results["ratios_above_floor"] = {  # the same, less what each process holds before any model
        f"{system}_peak_rss_many_{q}": (median[f"{system}_{q}"]["peak_rss_many"] - floors["engine"])
        / (median[f"ct2_{q}"]["peak_rss_many"] - floors["ct2"]) for system in ("engine", "engine_eager")
        for q in ("float32", "int8")}
    print(json.dumps({"floors_mib": {k: round(v / 2**20) for k, v in floors.items()}, **results["ratios"],
                      "above_floor": results["ratios_above_floor"]}, indent=1))
    labels = list(median)
    write_results(results, args.output, ("seconds from launch to the first answer (lower is better)", labels,
                                         [median[n]["startup_s"] for n in labels], "seconds"))


if __name__ == "__main__":
    main()
