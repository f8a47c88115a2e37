"""One adapter of every PEFT method served on one loaded base, against one base per method: the memory each takes
and the time to answer the same questions (every adapter's, in one mixed call vs one call per base), on t5-small
shapes with random weights; the outputs must agree.

python benchmarks/methods_serving.py [--config t5-small] [--output benchmarks/results/methods_serving.json]

Each layout is loaded in a fresh process. Two memory figures: the tensors the layout holds (distinct storages,
bytes: what a GPU would hold), and the growth of the process's resident set from before the base is loaded to after
the adapters are (peak, VmHWM). The second understates separate bases on a CPU: transformers maps the safetensors
file, and the pages of one file count once however many models map it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jokes_records, machine, write_results  # noqa: E402
from serve_throughput import make_base  # noqa: E402

QUESTIONS = 8  # per adapter


def make_method_adapters(folder: Path, config: str) -> dict[str, str]:
    """One jokes adapter per method on the random-weight base, its trainable weights moved off their start."""
    from peft_t5.adapters import save_adapter
    from peft_t5.methods import METHODS
    from peft_t5.modeling import add_adapter, load_base_model, tiny_tokenizer

    base = make_base(folder, config)
    adapters = {}
    for seed, name in enumerate(METHODS):
        torch.manual_seed(seed)
        model = add_adapter(load_base_model(base), METHODS[name].build(METHODS[name].settings({}), 100))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        meta = {"task": "jokes", "base_model": base, "template": "{question}", "max_source_length": 512}
        save_adapter(model, tiny_tokenizer(), folder / name, meta, "benchmark adapter")
        adapters[name] = str(folder / name)
    return adapters


def peak_kib() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM")))


def run_layout(layout: str, adapters: dict[str, str], questions: list[str]) -> dict:
    """In this process: load the layout, answer every adapter's questions, report memory, time and outputs."""
    from peft_t5.bank import AdapterBank

    torch.set_num_threads(2)
    before = peak_kib()
    if layout == "one_base":
        banks = {name: bank for bank in [AdapterBank.load(None, adapters)] for name in adapters}
    else:
        banks = {name: AdapterBank.load(None, {name: path}) for name, path in adapters.items()}
    loaded = peak_kib()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for bank in {id(b): b for b in banks.values()}.values() for model in bank.models()
                for t in [*model.parameters(), *model.buffers()]}
    items = [(name, q) for name in adapters for q in questions]
    started = time.perf_counter()
    if layout == "one_base":
        outputs = banks[next(iter(adapters))].generate_mixed(items, raw=True, max_new_tokens=16)
    else:
        outputs = [o for name in adapters for o in banks[name].generate(name, questions, raw=True, max_new_tokens=16)]
    seconds = time.perf_counter() - started
    return {"tensors_mib": sum(storages.values()) / 2**20, "rss_growth_mib": (loaded - before) / 1024,
            "generate_seconds": seconds, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="t5-small")
    parser.add_argument("--output", default="benchmarks/results/methods_serving.json")
    parser.add_argument("--layout", help=argparse.SUPPRESS)  # internal: run one layout in this process
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    records, source = jokes_records()
    questions = [r["question"] for r in records[:QUESTIONS]]
    if args.layout:
        print(json.dumps(run_layout(args.layout, json.loads(args.adapters), questions)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_method_adapters(Path(tmp), args.config)
        layouts = {}
        for layout in ("one_base", "one_base_per_method"):
            run = subprocess.run([sys.executable, __file__, "--layout", layout, "--adapters", json.dumps(adapters)],
                                 check=True, capture_output=True, text=True)
            layouts[layout] = json.loads(run.stdout.strip().splitlines()[-1])
    one, many = layouts["one_base"], layouts["one_base_per_method"]
    agree = one["outputs"] == many["outputs"]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": args.config,
               "methods": list(adapters), "questions": f"{QUESTIONS} per adapter, {source}", "max_new_tokens": 16,
               "outputs_agree": agree, "tensors_ratio": one["tensors_mib"] / many["tensors_mib"],
               "rss_ratio": one["rss_growth_mib"] / many["rss_growth_mib"],
               "time_ratio": one["generate_seconds"] / many["generate_seconds"],
               "layouts": {k: {m: v for m, v in d.items() if m != "outputs"} for k, d in layouts.items()}}
    for name, d in results["layouts"].items():
        print(f"{name:20} tensors {d['tensors_mib']:7.1f} MiB  RSS +{d['rss_growth_mib']:6.1f} MiB  "
              f"{d['generate_seconds']:6.2f} s")
    print(f"one base / one per method: tensors {results['tensors_ratio']:.2f}x, RSS {results['rss_ratio']:.2f}x, "
          f"time {results['time_ratio']:.2f}x, outputs agree: {agree}")
    write_results(results, args.output)
    if not agree:
        sys.exit("the outputs of the two layouts differ")


if __name__ == "__main__":
    main()
