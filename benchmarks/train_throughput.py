"""Training throughput on T5 shapes with the real SQuAD v2 or jokes length distribution, setups side by side:

1. baseline: the original notebook's recipe: a plain PyTorch loop, sources and targets padded to a fixed length,
   random batches (squad: full fine-tuning, 512 / 24 tokens, batch 16, gc.collect() + empty_cache() every step;
   jokes: LoRA, 64 / 64 tokens, batch 8), Adafactor lr 1e-3;
2. hf_defaults: Seq2SeqTrainer + LoRA, padding to the longest in randomly ordered batches, default AdamW;
3. peft_t5: the toolkit's path as `train_lora.py` runs it (training.build_trainer): LoRA, length-grouped
   batches by tokens on a GPU (auto budget) or by count on a CPU, GroupedAdafactor, bf16 where the hardware
   runs it fast. Variants: _fp32, _tokens (an explicit --budget), _count (token budget off), _hf_adafactor
   (transformers' per-tensor Adafactor), _eager (eager attention instead of SDPA), _qlora.

Useful tokens are non-pad source and target tokens; FLOPs and the matmul rate come from peft_t5.throughput.
python benchmarks/train_throughput.py [--quick] [--task squad|jokes] [--config t5-small|flan-t5-large] [--output F]
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, device, jokes_records, machine, model_from_config, squad_records, write_results  # noqa: E402

from peft_t5.batching import auto_token_budget  # noqa: E402
from peft_t5.data import tokenize  # noqa: E402
from peft_t5.methods import TRAINABLE, get_method  # noqa: E402
from peft_t5.modeling import add_lora, bf16_supported, load_tokenizer, prepare_for_training, quantize  # noqa: E402
from peft_t5.tasks import get_task  # noqa: E402
from peft_t5.throughput import matmul_rate, model_flops_per_token  # noqa: E402

LENGTHS = {"squad": (512, 24), "jokes": (512, 64)}  # the toolkit's truncation limits per task
NOTEBOOK = {"squad": dict(source=512, target=24, batch=16, lora=False),  # what the original notebooks padded to
            "jokes": dict(source=64, target=64, batch=8, lora=True)}


class CountingCollator:
    """Wraps a collator and records, per batch, useful (non-pad) source, useful target and total tokens."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        self.batches.append((int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()),
                             batch["input_ids"].numel() + batch["labels"].numel()))
        return batch


def run_baseline(task, config, dataset, tokenizer, steps, warmup):
    from transformers import DataCollatorForSeq2Seq
    from transformers.optimization import Adafactor

    recipe, dev = NOTEBOOK[task], device()
    model = model_from_config(config).to(dev)
    model = (add_lora(model) if recipe["lora"] else model).train()
    pad = DataCollatorForSeq2Seq(tokenizer, model=model, padding="max_length", max_length=recipe["source"],
                                 label_pad_token_id=-100)
    target = recipe["target"]

    def collate(features):  # the notebook padded (and cut) sources and targets to fixed lengths
        features = [dict(f, input_ids=f["input_ids"][:recipe["source"]], attention_mask=f["attention_mask"][:recipe["source"]],
                         labels=f["labels"][:target] + [-100] * (target - len(f["labels"][:target]))) for f in features]
        return pad(features)

    counter = CountingCollator(collate)
    loader = torch.utils.data.DataLoader(dataset.remove_columns(["length"]), batch_size=recipe["batch"], shuffle=True,
                                         collate_fn=counter, generator=torch.Generator().manual_seed(0))
    optimizer = Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-3, relative_step=False,
                          scale_parameter=False, warmup_init=False)
    it = iter(loader)
    with PeakMemory() as mem:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            batch = {k: v.to(dev) for k, v in next(it).items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return summarise(counter.batches[warmup:warmup + steps], seconds, steps, mem,
                     model_flops_per_token(model, trains_base=not recipe["lora"]), len(loader))


class StepClock:
    """A Trainer callback that starts the clock after the warm-up steps."""

    def __init__(self, warmup):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    clock.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.end = time.perf_counter()

        self.callback = Callback()


def run_trainer(task, config, dataset, tokenizer, steps, warmup, batch_size, toolkit: bool, bf16: bool, qlora=False,
                budget="auto", optimizer="grouped", attention=None, epoch=False, method="lora"):
    """One Trainer setup; epoch=True trains one whole epoch (warm-up steps included in the clock)."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from peft_t5.arguments import TrainingArguments
    from peft_t5.trainer import build_trainer

    dtype = torch.bfloat16 if (toolkit and bf16) else torch.float32  # with bf16 the frozen base is stored in bf16
    model = model_from_config(config, dtype, attention)
    table = get_method(method)  # the method's defaults, as train_lora.py --method builds it (full: no adapter)
    model = prepare_for_training(quantize(model_from_config(config)) if qlora else model, table, table.settings({}),
                                 warmup + steps)
    if budget == "auto":
        budget, how = auto_token_budget(model, bf16)
    clock = StepClock(0 if epoch else warmup)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(output_dir=tmp, per_device_train_batch_size=batch_size, report_to="none", save_strategy="no",
                      eval_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
                      bf16=bf16, use_cpu=not torch.cuda.is_available(),
                      **({"num_train_epochs": 1} if epoch else {"max_steps": warmup + steps}))
        if toolkit:  # the toolkit's own defaults: Adafactor, length-grouped batches, multiple-of-8 padding
            args = TrainingArguments(eval_on_start=False, load_best_model_at_end=False, **common)
            lengths = LENGTHS[task]
            trainer = build_trainer(model, tokenizer, get_task(task), dataset, None, args, [], *lengths,
                                    max_tokens_per_batch=budget)
            if optimizer == "transformers":
                trainer.optimizer_cls_and_kwargs = None  # the Trainer's own: transformers' Adafactor
            counter = CountingCollator(trainer.data_collator)
        else:
            args = Seq2SeqTrainingArguments(**common)
            counter = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=model))
            trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset.remove_columns(["length"]),
                                     data_collator=counter, processing_class=tokenizer)
        trainer.data_collator = counter
        trainer.add_callback(clock.callback)
        with PeakMemory() as mem:
            trainer.train()
        steps_per_epoch = len(trainer.get_train_dataloader())
    timed = counter.batches if epoch else counter.batches[warmup:warmup + steps]
    result = summarise(timed, clock.end - clock.start, len(timed), mem, model_flops_per_token(model), steps_per_epoch)
    result.update(max_tokens_per_batch=budget, epoch_measured=epoch)
    return result


def summarise(batches, seconds, steps, mem, flops, steps_per_epoch) -> dict:
    source, target = sum(b[0] for b in batches), sum(b[1] for b in batches)
    useful, total = source + target, sum(b[2] for b in batches)
    achieved = (flops[0] * source + flops[1] * target) / seconds
    return {"useful_tokens_per_s": useful / seconds, "steps_per_s": steps / seconds, "seconds_per_step": seconds / steps,
            "pad_share": 1 - useful / total, "peak_memory_gib": (mem.peak - mem.start) / 1024**3,
            "peak_allocated_gib": mem.peak / 1024**3 if torch.cuda.is_available() else None,
            "steps_per_epoch": steps_per_epoch,
            "epoch_seconds": seconds / steps * steps_per_epoch, "achieved_flop_per_s": achieved}


SETUPS = {  # name -> (runner kind, options)
    "baseline": ("baseline", {}),
    "hf_defaults": ("trainer", dict(toolkit=False, bf16=False)),
    "peft_t5": ("trainer", dict(toolkit=True)),
    "peft_t5_fp32": ("trainer", dict(toolkit=True, bf16=False)),
    "peft_t5_tokens": ("trainer", dict(toolkit=True, budget="explicit")),
    "peft_t5_count": ("trainer", dict(toolkit=True, budget=None)),
    "peft_t5_hf_adafactor": ("trainer", dict(toolkit=True, optimizer="transformers")),
    "peft_t5_eager": ("trainer", dict(toolkit=True, attention="eager")),
    "peft_t5_qlora": ("trainer", dict(toolkit=True, qlora=True, budget="explicit")),
    **{f"peft_t5_{name}": ("trainer", dict(toolkit=True, bf16=False, method=name))  # float32, as peft_t5_fp32
       for name in TRAINABLE if name != "lora"},
}


def run_one(name: str, args) -> dict:
    steps = args.steps or (1 if args.quick else 20)
    warmup = 1 if args.quick else 2
    tokenizer = load_tokenizer("tiny")
    if args.task == "squad":
        records, _ = squad_records(1200)  # enough for length grouping to form its mega-batches
    else:
        records, _ = jokes_records()  # all of them: the batch count of an epoch depends on every length
    dataset, _ = tokenize(get_task(args.task), records, tokenizer, *LENGTHS[args.task])
    kind, options = SETUPS[name]
    if kind == "baseline":
        return run_baseline(args.task, args.config, dataset, tokenizer, steps, warmup)
    options = dict(options)
    options.setdefault("bf16", bf16_supported())
    if options.get("budget") == "explicit":
        options["budget"] = args.budget
    epoch = args.epoch and name == "peft_t5"
    return run_trainer(args.task, args.config, dataset, tokenizer, steps, warmup, args.batch_size, epoch=epoch, **options)


def main() -> None:
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Batch 8, 1 timed step per setup (CI-sized machines)")
    parser.add_argument("--output", default="benchmarks/results/train_throughput.json")
    parser.add_argument("--task", choices=["squad", "jokes"], default="squad")
    parser.add_argument("--config", default="t5-small", help="A config in benchmarks/configs/ (t5-small, flan-t5-large)")
    parser.add_argument("--steps", type=int, help="Timed steps per setup (default 1 quick, 20 full)")
    parser.add_argument("--batch_size", type=int, help="Examples a batch where batches are by count: default 16 (8 quick)")
    parser.add_argument("--budget", type=int, default=4096, help="peft_t5_tokens and peft_t5_qlora: tokens a batch")
    parser.add_argument("--epoch", action="store_true", help="peft_t5 trains one whole epoch (jokes: 31,761 records)")
    parser.add_argument("--setups", nargs="+", default=["baseline", "hf_defaults", "peft_t5", "peft_t5_fp32"],
                        choices=list(SETUPS))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # run one setup in this process, print its JSON
    args = parser.parse_args()
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return
    setups = {}
    for name in args.setups:  # one process per setup: a clean heap, so peak memory is that setup's own
        cmd = [sys.executable, __file__, "--only", name, "--config", args.config, "--batch_size", str(args.batch_size),
               "--task", args.task, "--budget", str(args.budget)]
        cmd += ["--quick"] * args.quick + ["--epoch"] * args.epoch + (["--steps", str(args.steps)] if args.steps else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
        if line is None:
            print(f"setup {name} failed:\n{out.stderr[-3000:]}", flush=True)
            setups[name] = {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output"}
            continue
        setups[name] = s = json.loads(line[len("RESULT "):])
        print(f"{name:21} {s['useful_tokens_per_s']:10.0f} useful tok/s  {s['seconds_per_step']:7.3f} s/step  "
              f"pad {s['pad_share']:.0%}  peak {s['peak_memory_gib']:.2f} GiB  epoch {s['epoch_seconds']:.0f} s"
              f"{' (measured)' if s.get('epoch_measured') else ''}", flush=True)
    bf16 = bf16_supported()
    rates = {"fp32": matmul_rate(torch.float32)}
    if bf16:
        rates["bf16"] = matmul_rate(torch.bfloat16)
    for name, s in setups.items():
        if "failed" not in s:
            uses_bf16 = bf16 and name.startswith("peft_t5") and name != "peft_t5_fp32"
            s["flop_utilisation"] = s["achieved_flop_per_s"] / rates["bf16" if uses_bf16 else "fp32"]
    tps = {k: v["useful_tokens_per_s"] for k, v in setups.items() if "failed" not in v}
    ratio = lambda a, b: tps[a] / tps[b] if {a, b} <= tps.keys() else None
    _, source = squad_records(1) if args.task == "squad" else jokes_records()
    results = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "task": args.task, "config": args.config,
        "data": source, "quick": args.quick, "batch_size": args.batch_size, "bf16": bf16, "matmul_flop_per_s": rates,
        "tokenizer": "tiny sentencepiece (vocab 2048): more tokens per word than T5's 32k vocabulary",
        "setups": setups,
        "speedup_vs_baseline": ratio("peft_t5", "baseline"), "speedup_vs_hf_defaults": ratio("peft_t5", "hf_defaults"),
        "grouped_vs_transformers_adafactor": ratio("peft_t5", "peft_t5_hf_adafactor"),
        "sdpa_vs_eager": ratio("peft_t5", "peft_t5_eager"),
        "tokens_vs_count_batches": ratio("peft_t5_tokens", "peft_t5_count"),
    }
    write_results(results, args.output, (f"useful training tokens per second ({args.task}, {args.config})",
                                          list(tps), list(tps.values()), "tokens/s"))
    print(", ".join(f"{k}: {v:.2f}x" for k, v in results.items() if k.endswith(("_baseline", "_defaults", "_adafactor",
                                                                                "_eager", "_batches")) and v)
          + f"; wrote {args.output}")


if __name__ == "__main__":
    main()
