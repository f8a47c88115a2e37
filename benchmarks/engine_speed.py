"""CPU cost per sequence of the serving engine against CTranslate2, side by side in one run: t5-small shapes (random
weights; --config flan-t5-large for the jokes task's base), real SQuAD v2 prompts (long: the encoder weighs) or real
jokes questions (--prompts jokes, short: the decoder step is the cost), every sequence forced to exactly --tokens new
tokens.

  engine:        serve/engine.py, 2 LoRA adapters unmerged, rows of both in every step, the compiled step, float32
  engine_eager:  the same with the eager step (serve --compile off): the reference the compiled one replaces
  engine_int8:   the compiled step after quantize_int8 (serve --quantize int8)
  engine_no_kernels, engine_int8_no_kernels: engine and engine_int8 with PEFT_T5_KERNELS=off (MKL's and oneDNN's
                 products only, none of peft-t5's kernels; not run unless named)
  engine_int8_unpacked: engine_int8 with PEFT_T5_PACKED=off (the int8 layers row-major: peft-t5's VNNI kernel at 1-8
                 rows of the smaller layers, oneDNN's other products: the int8 engine before its packed kernel
                 without AMX; not run unless named)
  engine_int8_no_amx: engine_int8 with PEFT_T5_AMX=off (on a CPU with AMX: AVX512-VNNI's tiles over the packed
                 weights for several rows, not AMX's; not run unless named)
  engine_frozen, engine_int8_frozen, engine_bf16_frozen: engine, engine_int8 and engine_bf16 with PEFT_T5_HELD=off
                 (the compiled graphs' oneDNN products on inductor's frozen, prepacked weights: the engine before
                 weights held by number; not run unless named)
  engine_inductor_attention, engine_int8_inductor_attention: engine and engine_int8 with PEFT_T5_ATTENTION=off
                 (the compiled step's attention as inductor's fused loops, not peft-t5's kernel: the engine before
                 that kernel; not run unless named)
  engine_int8_f32_cache: engine_int8 with float32 attention caches (serve --quantize int8 --kv_cache_dtype float32:
                 the int8 engine before its caches were bfloat16 by default; not run unless named)
  engine_cache_bf16: engine with bfloat16 attention caches (serve --kv_cache_dtype bfloat16; not run unless named)
  engine_module_guards, engine_int8_module_guards: engine and engine_int8 with PEFT_T5_MODULE_GUARDS=on (dynamo's
                 guards on the step's modules kept, as before compiled.own_forward; not run unless named)
  engine_onednn_f32: engine with PEFT_T5_F32_TILES=off (the float32 step's products of several rows oneDNN's over
                 its held copies, not peft-t5's f32_tiles: the engine before them; not run unless named)
  engine_bf16:   the compiled step, base loaded in bfloat16 (serve --dtype bfloat16; CPUs with AMX or AVX512-BF16)
  ct2:           CTranslate2 on the merged model (one adapter: what `peft-t5 export` writes), float32
  ct2_int8:      the same converted with --quantization int8

Each system runs in a process of its own for the whole benchmark (an engine's graphs compile once, before anything
is timed), as it would be deployed: in one process, taking turns, each slowed the other's next rounds (t5-small int8,
jokes: the engine's 8-row rounds 0.024-0.056 CPU-s/seq with CTranslate2 beside it, 0.023-0.025 alone; CTranslate2's
0.020-0.027 and 0.018-0.020). The machines these run on are shared: each cell runs every system --rounds times in
turn and keeps each system's median; the CPU seconds are each system's process's, every thread counted.

python benchmarks/engine_speed.py [--quick] [--config t5-small|flan-t5-large] [--prompts squad|jokes] [--tokens 32]
                                  [--batches 1 8 32] [--rounds 3] [--adapters 1|2] [--threads 1] [--systems engine ct2 ...]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402

SYSTEMS = ("engine", "engine_eager", "engine_int8", "engine_bf16", "ct2", "ct2_int8")
OPTIONAL = ("engine_no_kernels", "engine_int8_no_kernels", "engine_int8_unpacked", "engine_int8_no_amx", "engine_frozen", "engine_int8_frozen",
            "engine_bf16_frozen", "engine_inductor_attention", "engine_int8_inductor_attention", "engine_int8_f32_cache",
            "engine_cache_bf16", "engine_module_guards", "engine_int8_module_guards", "engine_onednn_f32")


class RunningEngine:
    """An engine serving on an event loop of its own thread, for the whole benchmark."""

    def __init__(self, bank, rows: int, threads: int, compile: bool, kv_cache_dtype: str = "auto"):
        from peft_t5.serve.engine import Engine

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.engine = Engine(bank, max_rows=rows, max_encode_tokens=512 * rows, max_rows_per_request=rows,
                             threads=threads, compile=compile, kv_cache_dtype=kv_cache_dtype)
        self.call(self._start())
        started = time.perf_counter()
        self.engine.wait_compiled()
        self.compile_s = time.perf_counter() - started if compile else None

    async def _start(self):
        self.engine.start()

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def generate(self, names: list[str], sources: list[str], tokens: int, batch: int) -> list[str]:
        outputs = []
        for start in range(0, len(sources), batch):
            outputs += self.call(self.engine.generate(names[start:start + batch], sources[start:start + batch], tokens,
                                                      min_new_tokens=tokens))
        return outputs

    def stop(self) -> None:
        self.call(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


def cpu_seconds(fn) -> tuple[float, float, object]:
    """(CPU seconds of this process, every thread's, and wall seconds) of fn(), and its result."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def ct2_outputs(translator, tokenizer, sources, tokens: int, batch: int) -> list[str]:
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(s, truncation=True, max_length=512).input_ids) for s in sources]
    results = translator.translate_batch(pieces, max_batch_size=batch, beam_size=1, max_decoding_length=tokens,
                                         min_decoding_length=tokens, max_input_length=512)
    return [tokenizer.convert_tokens_to_string(r.hypotheses[0]) for r in results]


def serve_system(system: str, base: str, adapters: dict, folder: str, rows: int, threads: int, conn) -> None:
    """A child process's work: build one system, say "ready" (with its compile seconds), then run each
    (names, sources, tokens, batch) it is sent and send back (CPU seconds, wall seconds, outputs); None ends it."""
    torch.set_num_threads(1)  # this thread's; an engine's model thread gets --threads
    if system.endswith("_no_kernels"):
        os.environ["PEFT_T5_KERNELS"] = "off"
    if system.endswith("_no_amx"):
        os.environ["PEFT_T5_AMX"] = "off"
    if system.endswith("_unpacked"):
        os.environ["PEFT_T5_PACKED"] = "off"
    if system.endswith("_frozen"):
        os.environ["PEFT_T5_HELD"] = "off"
    if system.endswith("_module_guards"):
        os.environ["PEFT_T5_MODULE_GUARDS"] = "on"
    if system.endswith("_inductor_attention"):
        os.environ["PEFT_T5_ATTENTION"] = "off"
    if system.endswith("_onednn_f32"):
        os.environ["PEFT_T5_F32_TILES"] = "off"
    if system.startswith("engine"):
        from peft_t5.bank import AdapterBank
        from peft_t5.quantize import quantize_int8

        bank = AdapterBank.load(base, adapters, dtype="bfloat16" if system.startswith("engine_bf16") else "float32")
        if system.startswith("engine_int8"):
            quantize_int8(*bank.models())
        cache = "float32" if system.endswith("_f32_cache") else "bfloat16" if system == "engine_cache_bf16" else "auto"
        runner = RunningEngine(bank, rows, threads, compile=system != "engine_eager", kv_cache_dtype=cache)
        conn.send(("ready", runner.compile_s))
        while (job := conn.recv()) is not None:
            conn.send(cpu_seconds(lambda: runner.generate(*job)))
        runner.stop()
        return
    import ctranslate2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    translator = ctranslate2.Translator(folder, device="cpu", intra_threads=threads)
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        names, sources, tokens, batch = job
        conn.send(cpu_seconds(lambda: ct2_outputs(translator, tokenizer, sources, tokens, batch)))


class SystemProcess:
    """One system in a child process of its own (serve_system), started and built before the next one starts."""

    def __init__(self, system: str, *args):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_system, args=(system, *args, child), daemon=True)
        self.process.start()
        if not self.conn.poll(1800):
            raise TimeoutError(f"{system} was not ready in 30 min")
        _, self.compile_s = self.conn.recv()

    def run(self, names: list[str], sources: list[str], tokens: int, batch: int) -> tuple[float, float, list[str]]:
        self.conn.send((names, sources, tokens, batch))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(None)
        self.process.join(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sequences and one round")
    parser.add_argument("--config", choices=["t5-small", "flan-t5-large"], default="t5-small",
                        help="The base's shapes (benchmarks/configs; random weights)")
    parser.add_argument("--tokens", type=int, default=32, help="New tokens per sequence (forced)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", choices=["squad", "jokes"], default="squad")
    parser.add_argument("--adapters", type=int, choices=[1, 2], default=2,
                        help="Rows on one LoRA adapter, or on two mixed in every step")
    parser.add_argument("--threads", type=int, default=1, help="Threads of each system (CTranslate2's intra_threads)")
    parser.add_argument("--rounds", type=int, default=3, help="Each system's runs per cell, taken in turn; the median")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS + OPTIONAL, default=list(SYSTEMS))
    parser.add_argument("--output", default=None, help="default: benchmarks/results/engine_speed_PROMPTS.json")
    args = parser.parse_args()

    import ctranslate2
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peft_t5.modeling import bf16_supported, load_base_model
    from peft_t5.quantize import int8_path
    from peft_t5.tasks import get_task

    systems = [s for s in args.systems if not s.startswith("engine_bf16") or bf16_supported()]
    rounds = 1 if args.quick else args.rounds
    template = get_task(args.prompts).template
    records, data = squad_records(256) if args.prompts == "squad" else jokes_records()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "data": data, "tokens": args.tokens,
               "prompts": args.prompts, "threads": args.threads, "adapters": args.adapters, "rounds": rounds,
               "int8_path": int8_path(), "ctranslate2": ctranslate2.__version__,
               "setup": f"{args.config} shapes, random weights, {args.adapters} LoRA adapter(s) (r16 q,v) unmerged, "
                        "rows of each in every step; CTranslate2 on one merged; each system in a process of its own",
               "cpu_s_per_sequence": {}, "wall_s_per_sequence": {}, "compile_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_adapters(Path(tmp), args.config)
        merged = PeftModel.from_pretrained(load_base_model(base), adapters["jokes_a"]).merge_and_unload()
        merged.save_pretrained(f"{tmp}/merged")
        tokenizer = AutoTokenizer.from_pretrained(adapters["jokes_a"])
        tokenizer.save_pretrained(f"{tmp}/merged")
        for quantization in {"int8" if s == "ct2_int8" else "float32" for s in systems if s.startswith("ct2")}:
            ctranslate2.converters.TransformersConverter(f"{tmp}/merged").convert(
                f"{tmp}/ct2_{quantization}", quantization=quantization, force=True)
            tokenizer.save_pretrained(f"{tmp}/ct2_{quantization}")
        rows, processes = max(args.batches), {}
        for system in systems:
            folder = f"{tmp}/ct2_{'int8' if system == 'ct2_int8' else 'float32'}"
            processes[system] = SystemProcess(system, base, adapters, folder, rows, args.threads)
            results["compile_s"][system] = processes[system].compile_s
        outputs: dict[str, dict[int, list[str]]] = {}
        for batch in args.batches:
            count = batch * (1 if args.quick else 2) if batch > 1 else (4 if args.quick else 8)
            sources = [template.format(**r) for r in records[:count]]
            names = [list(adapters)[i % args.adapters] for i in range(count)]
            warm = count if batch > 1 else 2
            for system in systems:  # a warm-up: allocators, caches, buffers grown to this batch
                processes[system].run(names[:warm], sources[:warm], args.tokens, batch)
            costs: dict[str, list[tuple[float, float]]] = {s: [] for s in systems}
            for _ in range(rounds):
                for system in systems:
                    cpu, wall, out = processes[system].run(names, sources, args.tokens, batch)
                    costs[system].append((cpu / count, wall / count))
                    outputs.setdefault(system, {})[batch] = out
            for system in systems:
                cpu = statistics.median(c for c, _ in costs[system])
                results["cpu_s_per_sequence"].setdefault(system, {})[str(batch)] = cpu
                results["wall_s_per_sequence"].setdefault(system, {})[str(batch)] = statistics.median(
                    w for _, w in costs[system])
                print(f"batch {batch:3d} {system:13s} {cpu:.4f} CPU-s/seq  (rounds: "
                      f"{', '.join(f'{c:.4f}' for c, _ in costs[system])})", flush=True)
        for process in processes.values():
            process.stop()
    cost = results["cpu_s_per_sequence"]
    ratios = {}
    for ours, theirs in (("engine", "ct2"), ("engine_int8", "ct2_int8"), ("engine", "engine_no_kernels"),
                         ("engine_no_kernels", "ct2"), ("engine_int8", "engine_int8_no_kernels"),
                         ("engine_int8_no_kernels", "ct2_int8"), ("engine_int8", "engine_int8_no_amx"),
                         ("engine_int8_no_amx", "ct2_int8"), ("engine_int8", "engine_int8_unpacked"),
                         ("engine_int8_unpacked", "ct2_int8"), ("engine_int8", "engine_int8_frozen"),
                         ("engine_int8_frozen", "ct2_int8"), ("engine", "engine_frozen"), ("engine_frozen", "ct2"),
                         ("engine_bf16", "engine_bf16_frozen"), ("engine_bf16", "ct2"),
                         ("engine_bf16", "ct2_int8"), ("engine", "engine_eager"),
                         ("engine", "engine_inductor_attention"), ("engine_inductor_attention", "ct2"),
                         ("engine_int8", "engine_int8_inductor_attention"),
                         ("engine_int8_inductor_attention", "ct2_int8"), ("engine_int8", "engine_int8_f32_cache"),
                         ("engine_int8_f32_cache", "ct2_int8"), ("engine_cache_bf16", "engine"),
                         ("engine_cache_bf16", "ct2"), ("engine", "engine_onednn_f32"),
                         ("engine_onednn_f32", "ct2")):
        if ours in cost and theirs in cost:
            for b in map(str, args.batches):
                ratios[f"{ours}_vs_{theirs}_at_{b}"] = cost[theirs][b] / cost[ours][b]
    results["ratios"] = ratios  # throughput ratios: above 1, the first is faster
    agreement = {}
    for other in ("engine_int8", "engine_int8_unpacked", "engine_int8_f32_cache", "engine_cache_bf16", "engine_bf16",
                  "engine_eager", "engine_onednn_f32"):
        if other in outputs and "engine" in outputs:
            pairs = [(a, b) for batch in args.batches for a, b in zip(outputs[other][batch], outputs["engine"][batch])]
            agreement[other] = sum(a == b for a, b in pairs) / len(pairs)
    results["outputs_equal_to_engine_float32"] = agreement
    if "engine_int8" in outputs and "engine_int8_unpacked" in outputs:  # the same products, bit for bit
        pairs = [(a, b) for batch in args.batches
                 for a, b in zip(outputs["engine_int8"][batch], outputs["engine_int8_unpacked"][batch])]
        results["engine_int8_outputs_equal_to_unpacked"] = sum(a == b for a, b in pairs) / len(pairs)
    print({k: round(v, 2) for k, v in ratios.items()}, {k: f"{v:.0%}" for k, v in agreement.items()},
          {k: round(v, 1) for k, v in results["compile_s"].items() if v})
    top = str(max(args.batches))
    write_results(results, args.output or f"benchmarks/results/engine_speed_{args.prompts}.json",
                  (f"CPU-s per sequence, batch {top}, {args.tokens} tokens, {args.prompts} (lower is better)",
                   list(cost), [cost[n][top] for n in cost], "CPU seconds"))


if __name__ == "__main__":
    main()
