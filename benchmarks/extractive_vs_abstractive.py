"""Extractive or abstractive SQuAD v2 on the same split: `--task squad_extractive` (a span head) against `--task
squad` (generated answers), each trained with LoRA on the tiny base from the shared SQuAD v2 file split by article,
then scored by `peft_t5.evaluate` on the held-out articles. Reports EM, F1, HasAns/NoAns F1, the best-threshold F1,
training tokens/s (the run's own count: source tokens, and target tokens for the abstractive one) and answers/s in
evaluation, each with its ratio to the abstractive run.

The tiny base has random weights: its scores say nothing about either kind's quality (a random-init model answers
"no answer" or noise); the costs and the pipeline are what this measures. On a real base (t5-small, flan-t5-*), pass
--model and more --steps.

python benchmarks/extractive_vs_abstractive.py [--quick] [--model tiny] [--steps 200] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, REAL_SQUAD, machine  # noqa: E402

KINDS = ("squad", "squad_extractive")


def split_articles(path: Path, folder: Path, held_out: int, seed: int = 0) -> tuple[str, str]:
    """The file's articles shuffled once: the first `held_out` for validation, the rest for training."""
    data = json.loads(path.read_text(encoding="utf-8"))
    articles = list(data["data"])
    random.Random(seed).shuffle(articles)
    train, dev = folder / "train.json", folder / "dev.json"
    train.write_text(json.dumps({"version": "v2.0", "data": articles[held_out:]}), encoding="utf-8")
    dev.write_text(json.dumps({"version": "v2.0", "data": articles[:held_out]}), encoding="utf-8")
    return str(train), str(dev)


def run_kind(task: str, train: str, dev: str, folder: Path, args) -> dict:
    import peft_t5

    common = dict(model=args.model, data=train, validation_data=dev, max_steps=args.steps, max_source_length=256,
                  max_train_samples=args.train_samples, max_eval_samples=64, generation_eval_samples=64,
                  eval_strategy="no", save_strategy="no", report_to="none", sample_generations=0, disable_tqdm=True,
                  per_device_train_batch_size=8, learning_rate=1e-3, seed=0)
    started = time.perf_counter()
    result = peft_t5.train(task=task, output_dir=str(folder / task), **common)
    train_s = time.perf_counter() - started
    meta = json.loads((folder / task / "peft_t5.json").read_text(encoding="utf-8"))
    started = time.perf_counter()
    evaluated = peft_t5.evaluate(task=task, adapter=str(folder / task), data=dev, limit=args.eval_limit,
                                 predictions=str(folder / f"{task}.preds.json"), max_source_length=256,
                                 batch_size=16)
    eval_s = time.perf_counter() - started
    m = evaluated.metrics
    return {"task": task, "trainable_parameters": result.trainable_parameters, "train_wall_s": round(train_s, 1),
            "training_tokens_per_s": meta["throughput"].get("tokens_per_s"),
            "answers_per_s": round(args.eval_limit / eval_s, 2), "evaluated": args.eval_limit,
            "exact": round(m["exact"], 2), "f1": round(m["f1"], 2), "HasAns_f1": round(m.get("HasAns_f1", 0), 2),
            "NoAns_f1": round(m.get("NoAns_f1", 0), 2), "best_f1": round(m.get("best_f1", m["f1"]), 2),
            "na_threshold": evaluated.na_threshold}


def sizes(config_name: str) -> dict:
    """Trainable and total parameters of each kind with LoRA (r 16, q and v) on a config's shapes, on the meta
    device (no weights): the span head replaces the language-model head and trains beside the adapter."""
    import torch
    from transformers import AutoConfig, T5ForConditionalGeneration, T5ForQuestionAnswering

    from peft_t5.modeling import add_lora, count_parameters

    config = AutoConfig.from_pretrained(CONFIGS / f"{config_name}.json")
    out = {}
    for task, cls in (("squad", T5ForConditionalGeneration), ("squad_extractive", T5ForQuestionAnswering)):
        with torch.device("meta"):
            model = cls(config)
            if task == "squad_extractive":
                model = add_lora_span(model)
            else:
                model = add_lora(model)
        trainable, total = count_parameters(model)
        out[task] = {"trainable": trainable, "total": total}
    return out


def add_lora_span(model):
    from peft import get_peft_model

    from peft_t5.methods import get_method

    lora = get_method("lora")
    config = lora.build(lora.settings({}), 0)
    config.task_type = "QUESTION_ANS"
    return get_peft_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train_samples", type=int, default=4000)
    parser.add_argument("--eval_limit", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="20 steps, 200 training questions, 64 scored")
    parser.add_argument("--output", default="benchmarks/results/extractive_vs_abstractive.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_samples, args.eval_limit = 20, 200, 64
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0],
               "threads": os.environ.get("OMP_NUM_THREADS"), "data": str(REAL_SQUAD), "model": args.model,
               "steps": args.steps, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        train, dev = split_articles(REAL_SQUAD, Path(tmp), held_out=3)
        results["held_out_articles"] = 3
        for task in KINDS:
            results["runs"].append(run_kind(task, train, dev, Path(tmp), args))
            print(json.dumps(results["runs"][-1]), flush=True)
    results["sizes"] = {name: sizes(name) for name in ("t5-small", "flan-t5-large")}
    print(json.dumps(results["sizes"]), flush=True)
    base = results["runs"][0]
    for run in results["runs"]:
        for key in ("training_tokens_per_s", "answers_per_s"):
            if base.get(key) and run.get(key):
                run[f"{key}_ratio"] = round(run[key] / base[key], 2)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
