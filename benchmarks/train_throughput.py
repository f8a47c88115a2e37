"""Training throughput on T5 shapes and the real SQuAD v2 length distribution, three setups in one run:

1. baseline: full fine-tuning, sources padded to 512 and targets to 24, batches of 16 in random order, a plain
   PyTorch loop with Adafactor (lr 1e-3), gc.collect() and empty_cache() after every step (the original notebook);
2. hf_defaults: Seq2SeqTrainer + LoRA, padding to the longest in randomly ordered batches, default optimizer;
3. peft_t5: the toolkit's path (training.build_trainer): LoRA, length-grouped batches, pad_to_multiple_of=8,
   Adafactor, bf16 where the hardware runs it fast. Also reported in float32 (peft_t5_fp32).

Useful tokens are non-pad source and target tokens. python benchmarks/train_throughput.py [--quick] [--output F]
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
from common import PeakMemory, device, machine, matmul_rate, model_from_config, squad_records, write_results  # noqa: E402

from peft_t5.data import seq2seq_collator, tokenize  # noqa: E402
from peft_t5.modeling import add_lora, bf16_supported, load_tokenizer, quantize  # noqa: E402
from peft_t5.tasks import get_task  # noqa: E402

MAX_SOURCE, MAX_TARGET = 512, 24


class CountingCollator:
    """Wraps a collator and records, per batch, useful (non-pad) and total source+target tokens."""

    def __init__(self, collate, pad_id: int):
        self.collate, self.pad_id, self.batches = collate, pad_id, []

    def __call__(self, features):
        batch = self.collate(features)
        useful = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        self.batches.append((useful, batch["input_ids"].numel() + batch["labels"].numel()))
        return batch


def flops_per_token(model, dataset, lora: bool) -> float:
    """Model FLOPs per useful token: (6 full, 4 LoRA) x parameters each token passes through, attention maps aside.

    A source token passes through the encoder, a target token through the decoder and the output layer. With a
    frozen base no weight gradients are computed: forward 2N + input gradients 2N.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enc = sum(p.numel() for n, p in base.named_parameters() if n.startswith("encoder."))
    dec = sum(p.numel() for n, p in base.named_parameters() if n.startswith("decoder.")) + base.lm_head.weight.numel()
    src = sum(dataset["length"])
    tgt = sum(len(x) for x in dataset["labels"])
    return (4 if lora else 6) * (enc * src + dec * tgt) / (src + tgt)


def run_baseline(config, dataset, tokenizer, steps, warmup, batch_size):
    from transformers import DataCollatorForSeq2Seq
    from transformers.optimization import Adafactor

    dev = device()
    model = model_from_config(config).to(dev).train()
    pad = DataCollatorForSeq2Seq(tokenizer, model=model, padding="max_length", max_length=MAX_SOURCE,
                                 label_pad_token_id=-100)

    def collate(features):  # the notebook padded sources to 512 and targets to 24
        features = [dict(f, labels=f["labels"][:MAX_TARGET] + [-100] * (MAX_TARGET - len(f["labels"][:MAX_TARGET])))
                    for f in features]
        return pad(features)

    counter = CountingCollator(collate, tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset.remove_columns(["length"]), batch_size=batch_size, shuffle=True,
                                         collate_fn=counter, generator=torch.Generator().manual_seed(0))
    optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
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
    return summarise(counter.batches[warmup:warmup + steps], seconds, steps, mem.peak - mem.start,
                     flops_per_token(model, dataset, lora=False))


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


def run_trainer(config, dataset, tokenizer, steps, warmup, batch_size, toolkit: bool, bf16: bool, qlora=False):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from peft_t5.arguments import TrainingArguments
    from peft_t5.training import build_trainer

    if qlora:
        model = add_lora(quantize(model_from_config(config)))
    else:  # with bf16 the frozen base is stored in bf16, as train_lora.py --bf16 does
        model = add_lora(model_from_config(config, torch.bfloat16 if (toolkit and bf16) else torch.float32))
    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
                      report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**6,
                      disable_tqdm=True, dataloader_pin_memory=False, seed=0, bf16=bf16,
                      use_cpu=not torch.cuda.is_available())
        if toolkit:  # the toolkit's own defaults: Adafactor, length-grouped batches, multiple-of-8 padding
            args = TrainingArguments(eval_on_start=False, load_best_model_at_end=False, **common)
            trainer = build_trainer(model, tokenizer, get_task("squad"), dataset, None, args, [], MAX_SOURCE, MAX_TARGET)
            counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
        else:
            args = Seq2SeqTrainingArguments(**common)
            counter = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=model), tokenizer.pad_token_id)
            trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset.remove_columns(["length"]),
                                     data_collator=counter, processing_class=tokenizer)
        trainer.data_collator = counter
        trainer.add_callback(clock.callback)
        with PeakMemory() as mem:
            trainer.train()
    return summarise(counter.batches[warmup:warmup + steps], clock.end - clock.start, steps, mem.peak - mem.start,
                     flops_per_token(model, dataset, lora=True))


def summarise(batches, seconds, steps, peak_bytes, flops_per_useful_token) -> dict:
    useful, total = sum(b[0] for b in batches), sum(b[1] for b in batches)
    return {"useful_tokens_per_s": useful / seconds, "steps_per_s": steps / seconds, "seconds_per_step": seconds / steps,
            "pad_share": 1 - useful / total, "peak_memory_gib": peak_bytes / 1024**3,
            "flops_per_useful_token": flops_per_useful_token,
            "achieved_flop_per_s": flops_per_useful_token * useful / seconds}


def run_one(name: str, args) -> dict:
    steps = args.steps or (1 if args.quick else 20)
    warmup = 1 if args.quick else 2
    tokenizer = load_tokenizer("tiny")
    records, _ = squad_records(1200)  # enough for length grouping to form its mega-batches
    dataset, _ = tokenize(get_task("squad"), records, tokenizer, MAX_SOURCE, MAX_TARGET)
    bf16 = bf16_supported()
    common = (args.config, dataset, tokenizer, steps, warmup, args.batch_size)
    runners = {
        "baseline": lambda: run_baseline(*common),
        "hf_defaults": lambda: run_trainer(*common, toolkit=False, bf16=False),
        "peft_t5": lambda: run_trainer(*common, toolkit=True, bf16=bf16),
        "peft_t5_fp32": lambda: run_trainer(*common, toolkit=True, bf16=False),
        "peft_t5_qlora": lambda: run_trainer(*common, toolkit=True, bf16=bf16, qlora=True),
    }
    return runners[name]()


def main() -> None:
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Batch 8, 1 timed step per setup (CI-sized machines)")
    parser.add_argument("--output", default="benchmarks/results/train_throughput.json")
    parser.add_argument("--config", default="t5-small", help="A config in benchmarks/configs/ (t5-small, flan-t5-large)")
    parser.add_argument("--steps", type=int, help="Timed steps per setup (default 1 quick, 20 full)")
    parser.add_argument("--batch_size", type=int, help="Default 16 (8 with --quick)")
    parser.add_argument("--setups", nargs="+", default=["baseline", "hf_defaults", "peft_t5", "peft_t5_fp32"],
                        help="Also: peft_t5_qlora")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # run one setup in this process, print its JSON
    args = parser.parse_args()
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return
    setups = {}
    for name in args.setups:  # one process per setup: a clean heap, so peak memory is that setup's own
        cmd = [sys.executable, __file__, "--only", name, "--config", args.config, "--batch_size", str(args.batch_size)]
        cmd += ["--quick"] * args.quick + (["--steps", str(args.steps)] if args.steps else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"setup {name} failed:\n{out.stderr[-3000:]}")
        setups[name] = json.loads(line[len("RESULT "):])
        print(f"{name:14} {setups[name]['useful_tokens_per_s']:10.0f} useful tok/s  "
              f"{setups[name]['seconds_per_step']:7.3f} s/step  pad {setups[name]['pad_share']:.0%}  "
              f"peak {setups[name]['peak_memory_gib']:.2f} GiB", flush=True)
    bf16 = bf16_supported()
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32)
    rate_fp32 = rate if not bf16 else matmul_rate(torch.float32)
    for name, s in setups.items():
        uses_bf16 = bf16 and name in ("peft_t5", "peft_t5_qlora")
        s["flop_utilisation"] = s["achieved_flop_per_s"] / (rate if uses_bf16 else rate_fp32)
    tps = {k: v["useful_tokens_per_s"] for k, v in setups.items()}
    _, source = squad_records(1)
    results = {
        "machine": machine(), "config": args.config, "data": source, "quick": args.quick,
        "batch_size": args.batch_size, "bf16": bf16, "matmul_flop_per_s": {"bf16" if bf16 else "fp32": rate,
                                                                           "fp32": rate_fp32},
        "tokenizer": "tiny sentencepiece (vocab 2048): more tokens per word than T5's 32k vocabulary",
        "setups": setups,
        "speedup_vs_baseline": tps["peft_t5"] / tps["baseline"] if {"peft_t5", "baseline"} <= tps.keys() else None,
        "speedup_vs_hf_defaults": tps["peft_t5"] / tps["hf_defaults"] if {"peft_t5", "hf_defaults"} <= tps.keys() else None,
    }
    write_results(results, args.output, ("useful training tokens per second", list(tps), list(tps.values()), "tokens/s"))
    print(f"peft_t5 vs baseline: {results['speedup_vs_baseline'] or float('nan'):.2f}x, "
          f"vs HF defaults: {results['speedup_vs_hf_defaults'] or float('nan'):.2f}x; wrote {args.output}")


if __name__ == "__main__":
    main()
