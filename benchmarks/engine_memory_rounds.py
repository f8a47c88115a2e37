"""A serving process's memory over rounds of new prompts: every round 32 SQuAD prompts it has not seen (so lengths
it has not seen), 32 new tokens each, then idle until the engine has let go of the caches the rows grew. The engine
(2 LoRA adapters unmerged, compiled, float32 and int8) against CTranslate2 (the merged adapter), each in a fresh
process, t5-small shapes with random weights, 2 threads; after each round the process's RSS at the end of the round,
its peak so far (VmHWM) and its RSS once idle, in MiB. A process whose idle RSS climbs round after round holds
something for every shape it has seen (oneDNN's products, before their row counts were padded: onednn_held.cpp).

python benchmarks/engine_memory_rounds.py [--rounds 8] [--systems ...] [--output benchmarks/results/engine_memory_rounds.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_memory import SOURCE_LIMIT, THREADS, prepare, run_child, started_engine  # noqa: E402  (no torch)

TOKENS, ROWS = 32, 32
SYSTEMS = ("engine_float32", "engine_int8", "ct2_float32")


def memory() -> dict:
    status = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss": status["VmRSS"], "peak": status["VmHWM"]}


def engine_child(system: str, work: dict, rounds: list[list[str]]) -> list[dict]:
    for unused in ("scipy", "boto3", "bitsandbytes"):  # as serve() does
        sys.modules.setdefault(unused, None)
    import torch

    from peft_t5.bank import AdapterBank
    from peft_t5.quantize import quantize_int8
    from peft_t5.serve.engine import Engine

    torch.set_num_threads(1)
    bank = AdapterBank.load(work["base"], work["adapters"])
    if system.endswith("int8"):
        quantize_int8(*bank.models())
    engine, call = started_engine(Engine(bank, max_rows=ROWS, max_rows_per_request=ROWS, threads=THREADS,
                                         compile=True, compile_cache=work["cache"]))
    names, found = list(work["adapters"]), []
    for prompts in rounds:
        call(engine.generate([names[i % 2] for i in range(ROWS)], prompts, TOKENS, min_new_tokens=TOKENS))
        busy = memory()
        engine.wait_until(lambda: not engine.busy and not engine._grown(), timeout=120)
        found.append({"rss": busy["rss"], "peak": busy["peak"], "idle": memory()["rss"]})
    call(engine.stop())
    return found


def ct2_child(system: str, work: dict, rounds: list[list[str]]) -> list[dict]:
    import ctranslate2
    import tokenizers

    folder = work[system]
    tokenizer = tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")
    tokenizer.enable_truncation(SOURCE_LIMIT)
    translator = ctranslate2.Translator(folder, device="cpu", intra_threads=THREADS)
    found = []
    for prompts in rounds:
        translator.translate_batch([tokenizer.encode(s).tokens for s in prompts], max_batch_size=ROWS, beam_size=1,
                                   max_decoding_length=TOKENS, min_decoding_length=TOKENS)
        found.append({**memory(), "idle": memory()["rss"]})  # it frees its caches after a batch
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--output", default="benchmarks/results/engine_memory_rounds.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = json.loads(Path(args.work).read_text())
        child = ct2_child if args.child.startswith("ct2") else engine_child
        print(json.dumps(child(args.child, work, work["rounds"])), flush=True)
        return
    from common import machine, squad_records, write_results

    from peft_t5.tasks import get_task

    records, data = squad_records(ROWS * args.rounds)
    prompts = [get_task("squad").template.format(**r) for r in records]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": ROWS, "tokens": TOKENS,
               "threads": THREADS, "rounds": args.rounds, "data": data, "units": "MiB", "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(Path(tmp), f"{tmp}/inductor")
        work["rounds"] = [prompts[ROWS * r:ROWS * (r + 1)] for r in range(args.rounds)]
        work_file, fill_file = f"{tmp}/work.json", f"{tmp}/fill.json"
        Path(work_file).write_text(json.dumps(work))
        Path(fill_file).write_text(json.dumps({**work, "rounds": work["rounds"][:1]}))
        for system in args.systems:
            if system.startswith("engine"):
                run_child(system, fill_file, __file__)  # the compile cache filled (its figures not kept)
            results["systems"][system] = run_child(system, work_file, __file__)
            print(system, json.dumps(results["systems"][system]), flush=True)
    results["idle_growth"] = {  # MiB the idle RSS grew from the first round to the last
        system: found[-1]["idle"] - found[0]["idle"] for system, found in results["systems"].items()}
    print(json.dumps({"idle_growth": results["idle_growth"]}))
    write_results(results, args.output)


if __name__ == "__main__":
    main()
