"""CPU cost per sequence of the serving engine against today's generate() path and CTranslate2, side by side in one
run: t5-small shapes (random weights), real SQuAD v2 prompts (long: the encoder weighs) or real jokes questions
(--prompts jokes, short: the decoder step is the cost), every sequence forced to exactly --tokens new tokens.

  generate:     AdapterBank.generate_sources (what the static batcher runs), 2 LoRA adapters unmerged, one batch
  engine:       serve/engine.py, the same 2 adapters unmerged, rows of both in every step (float32)
  engine_int8:  the same after quantize_int8 (serve --quantize int8)
  ct2:          CTranslate2 on the merged model (one adapter: what `peft-t5 export` writes), float32
  ct2_int8:     the same converted with --quantization int8

python benchmarks/engine_speed.py [--quick] [--tokens 32] [--batches 1 8 32] [--prompts squad|jokes] [--adapters 1|2]
                                  [--threads 1] [--no_generate]
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
from common import jokes_records, machine, squad_records, write_results  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402


def timed(fn, threads: int) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, result), fn run on a thread of its own with all torch threads:
    the main thread keeps one (as `peft-t5 serve` does, see engine.model_thread_threads), so that whichever thread
    computes is the only one with an OpenMP team."""
    import threading

    found = {}

    def run():
        torch.set_num_threads(threads)
        found["result"] = fn()

    cpu, wall = time.process_time(), time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return time.process_time() - cpu, time.perf_counter() - wall, found["result"]


def measured(fn, names: list[str], sources: list[str], batch: int, threads: int) -> tuple[float, float, object]:
    """timed(fn) after a warm-up (allocators, caches, lazily made kernels, the engine's lane and slots): the whole
    work at the larger sizes, the first 2 sequences with one row at a time."""
    warm = len(sources) if batch > 1 else 2
    timed(lambda: fn(names[:warm], sources[:warm]), threads)
    return timed(lambda: fn(names, sources), threads)


def engine_outputs(bank, names, sources, tokens: int, batch: int, threads: int) -> list[str]:
    from peft_t5.serve.engine import Engine

    async def run():
        engine = Engine(bank, max_rows=batch, max_encode_tokens=512 * batch, max_rows_per_request=batch,
                        threads=threads)
        engine.start()
        try:
            outputs = []
            for start in range(0, len(sources), batch):
                outputs += await engine.generate(names[start:start + batch], sources[start:start + batch], tokens,
                                                 min_new_tokens=tokens)
            return outputs
        finally:
            await engine.stop()
    return asyncio.run(run())


def ct2_outputs(translator, tokenizer, sources, tokens: int, batch: int) -> list[str]:
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(s, truncation=True, max_length=512).input_ids) for s in sources]
    results = translator.translate_batch(pieces, max_batch_size=batch, beam_size=1, max_decoding_length=tokens,
                                         min_decoding_length=tokens, max_input_length=512)
    return [tokenizer.convert_tokens_to_string(r.hypotheses[0]) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sequences")
    parser.add_argument("--tokens", type=int, default=32, help="New tokens per sequence (forced)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", choices=["squad", "jokes"], default="squad")
    parser.add_argument("--adapters", type=int, choices=[1, 2], default=2,
                        help="Rows on one LoRA adapter, or on two mixed in every step")
    parser.add_argument("--threads", type=int, default=1, help="Threads of each system (CTranslate2's intra_threads)")
    parser.add_argument("--no_generate", action="store_true", help="Leave out generate() (the slowest)")
    parser.add_argument("--output", default="benchmarks/results/engine_speed.json")
    args = parser.parse_args()

    import ctranslate2
    from peft import PeftModel

    from peft_t5.bank import AdapterBank
    from peft_t5.modeling import load_base_model
    from peft_t5.quantize import quantize_int8
    from peft_t5.tasks import get_task

    torch.set_num_threads(1)
    template = get_task(args.prompts).template
    records, data = squad_records(256) if args.prompts == "squad" else jokes_records()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "data": data, "tokens": args.tokens,
               "prompts": args.prompts, "threads": args.threads, "adapters": args.adapters,
               "setup": f"t5-small shapes, random weights, {args.adapters} LoRA adapter(s) (r16 q,v) unmerged, "
                        "rows of each in every step; CTranslate2 on one merged",
               "cpu_s_per_sequence": {}, "wall_s_per_sequence": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_adapters(Path(tmp), "t5-small")
        merged = PeftModel.from_pretrained(load_base_model(base), adapters["jokes_a"]).merge_and_unload()
        merged.save_pretrained(f"{tmp}/merged")
        bank = AdapterBank.load(base, adapters)
        bank.tokenizer.save_pretrained(f"{tmp}/merged")
        for quantization in ("float32", "int8"):
            ctranslate2.converters.TransformersConverter(f"{tmp}/merged").convert(
                f"{tmp}/ct2_{quantization}", quantization=quantization, force=True)
        translators = {q: ctranslate2.Translator(f"{tmp}/ct2_{q}", device="cpu", intra_threads=args.threads)
                       for q in ("float32", "int8")}
        engine_float = {}

        def engine(n: list[str], s: list[str]) -> list[str]:
            return engine_outputs(bank, n, s, args.tokens, batch, args.threads)
        for batch in args.batches:
            count = batch * (1 if args.quick else 2) if batch > 1 else (4 if args.quick else 8)
            chosen = records[:count]
            sources = [template.format(**r) for r in chosen]
            names = [list(adapters)[i % args.adapters] for i in range(count)]
            systems = {
                "generate": lambda n, s: bank.generate_sources(n, s, max_new_tokens=args.tokens,
                                                               min_new_tokens=args.tokens, batch_size=batch),
                "engine": engine,
                "ct2": lambda n, s: ct2_outputs(translators["float32"], bank.tokenizer, s, args.tokens, batch),
                "ct2_int8": lambda n, s: ct2_outputs(translators["int8"], bank.tokenizer, s, args.tokens, batch),
            }
            if args.no_generate:
                del systems["generate"]
            for name, fn in systems.items():
                cpu, wall, outputs = measured(fn, names, sources, batch, args.threads)
                if name == "engine":
                    engine_float[batch] = outputs
                results["cpu_s_per_sequence"].setdefault(name, {})[str(batch)] = cpu / count
                results["wall_s_per_sequence"].setdefault(name, {})[str(batch)] = wall / count
                print(f"batch {batch:3d} {name:12s} {cpu / count:.4f} CPU-s/seq  {wall / count:.4f} s/seq", flush=True)
        quantize_int8(*bank.models())
        agreement = []
        for batch in args.batches:
            count = len(engine_float[batch])
            chosen = records[:count]
            sources = [template.format(**r) for r in chosen]
            names = [list(adapters)[i % args.adapters] for i in range(count)]
            cpu, wall, outputs = measured(engine, names, sources, batch, args.threads)
            results["cpu_s_per_sequence"].setdefault("engine_int8", {})[str(batch)] = cpu / count
            results["wall_s_per_sequence"].setdefault("engine_int8", {})[str(batch)] = wall / count
            print(f"batch {batch:3d} {'engine_int8':12s} {cpu / count:.4f} CPU-s/seq  {wall / count:.4f} s/seq")
            agreement += [a == b for a, b in zip(outputs, engine_float[batch])]
    cost = results["cpu_s_per_sequence"]
    top = str(max(args.batches))
    results["int8_outputs_equal_float32"] = sum(agreement) / len(agreement)
    results["ratios"] = {  # throughput ratios (higher: the engine is faster)
        f"engine_vs_ct2_{q}_at_{b}": cost[ct2][b] / cost[engine][b]
        for q, engine, ct2 in (("float32", "engine", "ct2"), ("int8", "engine_int8", "ct2_int8"))
        for b in map(str, args.batches)}
    if "generate" in cost:
        results["ratios"][f"engine_vs_generate_at_{top}"] = cost["generate"][top] / cost["engine"][top]
    print({k: round(v, 2) for k, v in results["ratios"].items() if v is not None},
          f"int8 outputs equal to float32: {results['int8_outputs_equal_float32']:.0%}")
    labels = [f"{n} b{top}" for n in cost]
    write_results(results, args.output, (f"CPU-s per sequence, batch {top}, {args.tokens} tokens (lower is better)",
                                         labels, [cost[n][top] for n in cost], "CPU seconds"))


if __name__ == "__main__":
    main()
