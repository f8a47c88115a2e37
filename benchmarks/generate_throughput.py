"""Generation throughput: greedy answers per second on SQuAD-like prompts, on T5 shapes (random weights).

Compared in one run (--quick: batches of 8 and 32 only): base, LoRA adapter unmerged, the same adapter merged (batch 1, 8, 32); and length-sorted
against randomly ordered batches at batch 32. Every answer is forced to the same number of new tokens, so
the setups do the same work. python benchmarks/generate_throughput.py [--quick] [--output F]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device, machine, model_from_config, squad_records, write_results  # noqa: E402

from peft_t5.modeling import add_lora, load_tokenizer  # noqa: E402
from peft_t5.tasks import get_task  # noqa: E402


@torch.inference_mode()
def answers_per_second(model, tokenizer, sources, batch_size, new_tokens, sort: bool) -> dict:
    order = list(range(len(sources)))
    if sort:
        order.sort(key=lambda i: len(sources[i]))
    else:
        random.Random(0).shuffle(order)
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        batch = tokenizer([sources[j] for j in order[i:i + batch_size]], return_tensors="pt", padding=True,
                          truncation=True, max_length=512).to(dev)
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    seconds = time.perf_counter() - start
    return {"answers_per_s": len(sources) / seconds, "new_tokens_per_s": len(sources) * new_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/generate_throughput.json")
    parser.add_argument("--config", default="t5-small")
    parser.add_argument("--prompts", type=int, help="Prompts per measurement (default 64 quick, 128 full)")
    parser.add_argument("--new_tokens", type=int, default=4, help="New tokens per answer (SQuAD answers are short)")
    args = parser.parse_args()
    n = args.prompts or (64 if args.quick else 128)
    tokenizer, task = load_tokenizer("tiny"), get_task("squad")
    records, source = squad_records(n)
    sources = [task.source(r) for r in records]

    base = model_from_config(args.config).to(device()).eval()
    adapted = add_lora(base, target_modules=["q", "v"]).eval()
    for name, p in adapted.named_parameters():  # a trained adapter's B is not zero; give it values
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    answers_per_second(adapted, tokenizer, sources[:8], 8, args.new_tokens, True)  # warm-up: kernels, allocator
    results = {"machine": machine(), "config": args.config, "data": source, "prompts": n,
               "new_tokens": args.new_tokens, "setups": {}}
    for batch_size in ((8, 32) if args.quick else (1, 8, 32)):  # --quick leaves out the slow batch of 1
        setups = {}
        with adapted.disable_adapter():
            setups["base"] = answers_per_second(adapted, tokenizer, sources, batch_size, args.new_tokens, True)
        setups["unmerged"] = answers_per_second(adapted, tokenizer, sources, batch_size, args.new_tokens, True)
        adapted.merge_adapter()
        setups["merged"] = answers_per_second(adapted, tokenizer, sources, batch_size, args.new_tokens, True)
        if batch_size == 32:
            setups["merged_random_order"] = answers_per_second(adapted, tokenizer, sources, batch_size,
                                                               args.new_tokens, False)
        adapted.unmerge_adapter()
        results["setups"][f"batch_{batch_size}"] = setups
        print(f"batch {batch_size:2}: " + "  ".join(f"{k} {v['answers_per_s']:.1f}/s" for k, v in setups.items()),
              flush=True)
    b32 = results["setups"]["batch_32"]
    results["speedup_merged_vs_unmerged"] = b32["merged"]["answers_per_s"] / b32["unmerged"]["answers_per_s"]
    results["speedup_sorted_vs_random"] = b32["merged"]["answers_per_s"] / b32["merged_random_order"]["answers_per_s"]
    labels = [f"{k} b{bs.split('_')[1]}" for bs, s in results["setups"].items() for k in s]
    values = [v["answers_per_s"] for s in results["setups"].values() for v in s.values()]
    write_results(results, args.output, ("greedy answers per second", labels, values, "answers/s"))
    print(f"batch 32: merged vs unmerged {results['speedup_merged_vs_unmerged']:.2f}x, "
          f"sorted vs random {results['speedup_sorted_vs_random']:.2f}x; wrote {args.output}")


if __name__ == "__main__":
    main()
