"""The training job, top to bottom: settings -> data -> model -> trainer -> save -> samples.

    import peft_t5
    result = peft_t5.train(task="jokes", model="tiny", max_steps=30, output_dir="adapters/jokes-tiny")
    result.output_dir, result.metrics["eval_loss"], result.trainable_parameters

The keywords are `peft-t5 train`'s flags (every Seq2SeqTrainingArguments flag too), or a YAML/JSON file of them with
keywords over it. Under torchrun/accelerate every process runs the job; only the main one prints, logs and writes.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .errors import Interrupted, PeftT5Error
from .methods import get_method
from .outputs import checkpoint_problem, checkpoints_newest_first, newest_whole_checkpoint, output_lock, saving_into
from .train_settings import TrainSettings, check_output_dir, from_keywords, resolve_defaults

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: str  # the adapter (or, with method full, the whole model)
    metrics: dict  # the final validation metrics (eval_loss, and the task's generation metric)
    method: str
    trainable_parameters: int


def train(config: str | Path | dict | None = None, *, callbacks: tuple = (), **flags) -> TrainResult:
    """Train an adapter (with method="full", a whole model). `config`: a YAML/JSON file of settings (or a dict);
    `flags`: the CLI's flags as keywords, over the file's. `callbacks`: more Trainer callbacks. A mistake raises
    PeftT5Error with the CLI's one-line message; Ctrl-C raises Interrupted (a KeyboardInterrupt) once the checkpoint
    to resume from is kept, and its message says where."""
    return run(from_keywords(config, flags), callbacks)


def run(settings: TrainSettings, callbacks: tuple = ()) -> TrainResult:
    """The job, from settings already parsed (the CLI's entry)."""
    with ExitStack() as held:  # the output folder's lock, released however the run ends
        return run_training(settings, held, callbacks)


def run_training(settings: TrainSettings, held: ExitStack, callbacks: tuple = ()) -> TrainResult:
    import torch
    import transformers

    from .adapters import (
        check_adapter_keys,
        quiet_adalora_warnings,
        save_adapter,
        save_initial_adapter,
        save_model_folder,
    )
    from .cards import model_card
    from .data import tokenize, tokenize_stream, tokenize_windows
    from .modeling import (
        TINY,
        count_parameters,
        load_base_model,
        load_tokenizer,
        prepare_for_training,
        quantization_config,
    )
    from .tasks import get_task
    from .trainer import StepBoundary, build_trainer, gathered_state_dict, plot_loss_curves

    warn_single_process_launch()
    model_args, data_args, lora_args, training_args = settings
    method = get_method(lora_args.method)
    held.enter_context(quiet_adalora_warnings(method.name == "adalora"))  # for checkpoints too
    method_settings = method.settings(lora_args.given())  # another method's flag is refused before anything is written
    if not sys.stderr.isatty() and "disable_tqdm" not in settings.given and not transformers.utils.is_in_notebook():
        training_args.disable_tqdm = True  # a log file gets a plain line per logging step, not bar redraws
    if training_args.disable_tqdm:
        import datasets

        datasets.disable_progress_bars()  # its tokenizing bars too
    task = get_task(data_args.task)
    resolve_defaults(task, model_args, data_args, training_args)
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *args, **kwargs: None)
    if not main_process:
        logging.getLogger("peft_t5").setLevel(logging.ERROR)  # the main process already says it
    adapter_dir = Path(training_args.output_dir)
    if main_process:
        held.enter_context(output_lock(adapter_dir))
    check_output_dir(adapter_dir, training_args.overwrite_output_dir,
                     training_args.resume or bool(training_args.resume_from_checkpoint))
    training_args.output_dir = str(adapter_dir / "checkpoints")  # checkpoints and logs live inside the adapter folder

    train_records, eval_records, test_records = load_data(task, data_args, training_args, say)
    tokenizer = load_tokenizer(model_args.model)
    transformers.set_seed(training_args.seed)  # before the LoRA init, so that a run is reproducible from its seed
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    spans = task.kind == "extractive"  # a span head (T5ForQuestionAnswering), answers read off the context
    base = load_base_model(model_args.model, qlora=model_args.qlora, dtype=dtype, trust_pickle=model_args.trust_pickle,
                           span_head=spans)
    budget = token_budget(training_args, base, data_args.streaming, say)
    model = prepare_for_training(base, method, method_settings,
                                 planned_steps(method, training_args, train_records, budget))
    initial = save_initial_adapter(model, held) if method_settings.get("init_lora_weights") in ("pissa", "olora") \
        else None
    trainable, total = count_parameters(model)
    say(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    lengths = dict(max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length)
    if data_args.doc_stride is None:
        data_args.doc_stride = min(128, data_args.max_source_length // 4)
    span_options = dict(doc_stride=data_args.doc_stride, max_answer_length=data_args.max_answer_length)
    if spans:
        train_dataset, stats = tokenize_windows(train_records, tokenizer, data_args.max_source_length,
                                                data_args.doc_stride)
        eval_dataset, eval_stats = tokenize_windows(eval_records, tokenizer, data_args.max_source_length,
                                                    data_args.doc_stride)
        say(f"training set: {stats}\nvalidation set: {eval_stats}")
    elif data_args.streaming:
        train_dataset, stats = tokenize_stream(task, train_records, tokenizer, **lengths), None
        say("training set: tokenized as it streams (truncation is not counted)")
    else:
        train_dataset, stats = tokenize(task, train_records, tokenizer, **lengths)
        say(f"training set: {stats}")
    if not spans:
        eval_dataset, eval_stats = tokenize(task, eval_records, tokenizer, **lengths)
        say(f"validation set: {eval_stats}")
    generated = min(len(eval_records), data_args.generation_eval_samples)
    say(f"each evaluation: the loss on all {len(eval_records):,} validation records, {task.main_metric} on the "
        f"{'spans answered' if spans else 'outputs generated'} for the first {generated:,} "
        "(--generation_eval_samples; --max_eval_samples caps both; evaluate.py scores a whole split)")

    trainer = build_trainer(model, tokenizer, task, train_dataset, eval_dataset, training_args,
                            eval_records[:data_args.generation_eval_samples], **lengths, max_tokens_per_batch=budget,
                            loraplus_lr_ratio=method_settings.get("loraplus_lr_ratio"),
                            span_options=span_options if spans else None)
    for callback in callbacks:
        trainer.add_callback(callback)
    resume = resume_checkpoint(training_args, say)
    if resume and (Path(resume) / "adapter_config.json").exists():
        check_adapter_keys(model, "default", resume)  # a checkpoint of another method would resume from nothing
    started = time.time()
    boundary = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepBoundary))
    try:
        with saving_into(adapter_dir, model), boundary.noting_ctrl_c():
            trainer.train(resume_from_checkpoint=resume)
            metrics = final_metrics(trainer)
    except KeyboardInterrupt:
        raise interrupted(trainer) from None
    # under FSDP / ZeRO-3 each process holds a shard: gather the full tensors (every process takes part)
    state_dict = gathered_state_dict(trainer.model_wrapped, trainer.accelerator)
    result = TrainResult(str(adapter_dir), metrics, method.name, trainable)
    if not trainer.is_world_process_zero():
        return result
    loss_before = next((e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), None)

    curve = Path(training_args.output_dir) / "loss_curve.png"
    plot_loss_curves(trainer.state.log_history, curve, f"{task.name} adapter on {model_args.model}")
    meta = {
        "task": task.name, "base_model": model_args.model, "template": task.template,
        "truncate_field": task.truncate_field, "qlora": model_args.qlora,
        "quantization": quantization_config(spans).to_dict() if model_args.qlora else None,
        "max_source_length": data_args.max_source_length, "max_target_length": data_args.max_target_length,
        "head": "span" if spans else "lm", **(span_options if spans else {}),
        "method": method.name, "settings": method_settings, "trainable_parameters": trainable,
        "data": data_args.data, "streaming": data_args.streaming,
        "train_records": None if data_args.streaming else len(train_records),
        "truncation": vars(stats) if stats else None, "processes": training_args.world_size,
        "metrics": metrics, "eval_loss_before": loss_before, "na_threshold": metrics.get("eval_best_f1_thresh"),
        "train_seconds": round(time.time() - started, 1),
        "max_tokens_per_batch": budget, "throughput": trainer.throughput.summary(),
        "training_args": json.loads(training_args.to_json_string()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": __import__("peft").__version__, "peft_t5": __import__("peft_t5").__version__},
    }
    with saving_into(adapter_dir, model):
        save = save_model_folder if method.whole_model else partial(save_adapter, initial_adapter=initial)
        save(trainer.accelerator.unwrap_model(trainer.model), tokenizer, adapter_dir, meta,
             model_card(meta, str(adapter_dir)), {"loss_curve.png": curve}, state_dict=state_dict)
    print(f"validation loss: {loss_before:.4f} before training -> {metrics['eval_loss']:.4f} after"
          if loss_before is not None else f"validation loss: {metrics['eval_loss']:.4f}")
    if f"eval_{task.main_metric}" in metrics:  # not with --generation_eval_samples 0
        print(f"{task.main_metric}: {metrics[f'eval_{task.main_metric}']:.2f}")
    print(f"model saved to {adapter_dir}/ (model.safetensors, config.json, loss_curve.png, README.md): pass it as "
          "--model or --base" if method.whole_model else
          f"adapter saved to {adapter_dir}/ (adapter_model.safetensors, loss_curve.png, README.md)")

    del trainer, model
    gc.collect()
    show_reloaded_samples(task, model_args, adapter_dir, test_records or eval_records, data_args, method.whole_model)
    if model_args.model == TINY:
        print("\nNote: `tiny` is a small T5 with random weights, a smoke test of the whole pipeline, not a useful "
              f"model.\nFor the real thing: python scripts/train_lora.py --task {task.name} "
              f"{real_data(task, data_args.data)}.")
    return result


def final_metrics(trainer) -> dict:
    """The validation metrics of the model the run ends with: those its last evaluation logged, where that was of
    this very model (the best checkpoint's step, or the last step); else one more evaluation. (An evaluation at the
    last step followed by trainer.evaluate() gave the same figures twice, at ~20% of a short run's time.)"""
    state, args = trainer.state, trainer.args
    step = state.best_global_step if args.load_best_model_at_end and state.best_global_step else state.global_step
    logged: dict = {}
    for entry in state.log_history:
        if entry.get("step") == step and any(key.startswith("eval_") for key in entry):
            logged.update({key: value for key, value in entry.items() if key != "step"})
    return logged if "eval_loss" in logged else trainer.evaluate()


def warn_single_process_launch() -> None:
    """`accelerate launch --num_processes N` on a machine without GPUs quietly starts one process."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning("accelerate launch started one process, not the --num_processes asked for: without GPUs it "
                       "needs --multi_gpu (which starts torchrun; CPU processes talk over gloo), or use torchrun")


def record_fates(splits: dict, data_args) -> str:
    """Where every record of the data went, in one line."""
    from collections import Counter

    used = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    parts = []
    for name, label in (("train", "training"), ("validation", "validation"), ("test", "test")):
        if name in splits:
            n, cap = len(splits[name]), used.get(name)
            parts.append(f"{n:,} {label}" + (f" ({cap:,} used)" if cap is not None and cap < n else ""))
    reasons = Counter(r["reason"] for r in splits.get("skipped", []))
    total = sum(len(splits[k]) for k in splits)
    skipped = f", {sum(reasons.values()):,} skipped: " + ", ".join(f"{n:,} {why}" for why, n in reasons.items()) \
        if reasons else ""
    return f"{total:,} records: " + ", ".join(parts) + skipped


def load_data(task, data_args, training_args, say) -> tuple:
    """(training records or stream, validation records, test records), as the data arguments ask."""
    options = dict(max_question_words=data_args.max_question_words, max_answer_words=data_args.max_answer_words)
    if data_args.streaming:
        from .data import stream_splits

        if training_args.max_steps <= 0:
            raise PeftT5Error("--streaming needs --max_steps: a stream has no length to count epochs in")
        held_out = data_args.max_eval_samples or 500
        train_records, eval_records = stream_splits(task, data_args.data, held_out, training_args.seed,
                                                    data_args.shuffle_buffer, data_args.validation_data, **options)
        if data_args.max_train_samples:
            train_records = train_records.take(data_args.max_train_samples)
        if not eval_records:
            raise PeftT5Error(f"{data_args.data}: no usable records to stream")
        source = data_args.validation_data or "them"
        say(f"task {task.name}: streaming training records from {data_args.data} (shuffle buffer "
            f"{data_args.shuffle_buffer:,}); the first {len(eval_records)} of {source} are the validation set")
        return train_records, eval_records, []
    splits = task.load_splits(data_args.data, seed=training_args.seed, validation_fraction=data_args.validation_fraction,
                              test_fraction=data_args.test_fraction, validation_data=data_args.validation_data, **options)
    train_records = splits["train"][:data_args.max_train_samples]
    eval_records = splits["validation"][:data_args.max_eval_samples]
    if not train_records or not eval_records:
        raise PeftT5Error(f"{data_args.data}: {len(train_records)} training and {len(eval_records)} validation records; "
                          "need at least one of each")
    sources = (f"training from {data_args.data}, validation from {data_args.validation_data}"
               if data_args.validation_data else f"from {data_args.data}")
    say(f"task {task.name}: {record_fates(splits, data_args)} ({sources})")
    return train_records, eval_records, splits.get("test") or []


def planned_steps(method, training_args, train_records, budget: int | None) -> int:
    """The optimizer steps the run will take, for a method whose schedule spans the run (AdaLoRA); 0 for others."""
    import math

    if not method.needs_steps or training_args.max_steps > 0:
        return max(training_args.max_steps, 0)
    if budget:
        raise PeftT5Error(f"--method {method.name} plans its schedule over the run's steps, and with batches by tokens "
                          "their number is known only once batching starts; pass --max_steps, or "
                          "--max_tokens_per_batch 0")
    per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                * training_args.world_size)
    return math.ceil(math.ceil(len(train_records) / per_step) * training_args.num_train_epochs)


def token_budget(training_args, model, streaming: bool, say) -> int | None:
    """--max_tokens_per_batch as a number (None: batches by count), and a line saying what was chosen."""
    from .batching import auto_token_budget

    if training_args.max_tokens_per_batch == "auto":
        budget, how = auto_token_budget(model, training_args.bf16)
    else:
        budget, how = int(training_args.max_tokens_per_batch) or None, "--max_tokens_per_batch"
    if budget and streaming:
        budget, how = None, "--streaming has no lengths to group by"
    say(f"batches: up to {budget:,} padded tokens each ({how})" if budget else
        f"batches: {training_args.per_device_train_batch_size} examples each ({how})")
    return budget


def resume_checkpoint(training_args, say) -> str | None:
    """The checkpoint to continue from: --resume_from_checkpoint, or with --resume the newest whole one in the
    checkpoints folder; incomplete ones (a kill or a full disk during a save) are named and removed."""
    import shutil

    from .adapters import check_adapter_dir

    if training_args.resume_from_checkpoint:
        chosen = Path(training_args.resume_from_checkpoint)
        problem = checkpoint_problem(chosen) if chosen.is_dir() else "no such folder"
        if problem:
            raise PeftT5Error(f"--resume_from_checkpoint {chosen}: {problem}; pass a whole checkpoint, or --resume for "
                              "the newest whole one")
        if (chosen / "adapter_config.json").exists():
            check_adapter_dir(chosen)
        return str(chosen)
    if not training_args.resume:
        return None
    folder = Path(training_args.output_dir)
    for checkpoint in checkpoints_newest_first(folder):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if (checkpoint / "adapter_config.json").exists():  # full fine-tuning checkpoints hold a model
                check_adapter_dir(checkpoint)
            say(f"resuming from {checkpoint}")
            return str(checkpoint)
        say(f"--resume: {checkpoint.name} is incomplete ({problem}; its save was interrupted): removed")
        if training_args.process_index == 0:
            shutil.rmtree(checkpoint, ignore_errors=True)
    raise PeftT5Error(f"--resume: no whole checkpoint in {folder}; train without --resume")


def interrupted(trainer) -> Interrupted:
    """Ctrl-C: the step reached and the checkpoint kept. Between two steps (an evaluation, the final one too) the
    steps trained since the last checkpoint are saved as one first."""
    from .trainer import StepBoundary

    step = trainer.state.global_step
    last = newest_whole_checkpoint(trainer.args.output_dir)
    between = all(c.between for c in trainer.callback_handler.callbacks if isinstance(c, StepBoundary))
    saved = ""
    if between and step > 0 and (last is None or int(last.name.split("-")[1]) < step):
        trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own checkpoint, which --resume takes
        last, saved = newest_whole_checkpoint(trainer.args.output_dir), " (saved now, the steps trained so far)"
    if last is None:
        return Interrupted(f"interrupted at step {step}; no checkpoint was saved yet, so nothing "
                           "is kept (checkpoints come with --save_strategy, each epoch by default)")
    return Interrupted(f"interrupted at step {step}; {last} is kept{saved}", resumable=True)


def real_data(task, data: str) -> str:
    """The flags a real run of `task` takes after a tiny one on `data`: the task's base, and the same data unless
    it was the bundled demo sample (then the task's Hub set, or the user's own file)."""
    if data != task.sample:
        return f"--model {task.default_model} --data {data}"
    if Path(task.default_data).exists():
        return f"--data YOUR_FILE (base {task.default_model}; the bundled sample is a demo)"
    return f"(base {task.default_model}, data {task.default_data} from the Hub)"


def show_reloaded_samples(task, model_args, adapter_dir: Path, records: list[dict], data_args,
                          whole_model: bool = False) -> None:
    """Reload the saved adapter with plain PEFT (a whole model with transformers) and print a few generations next
    to the references."""
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoTokenizer

    from .extractive import answer_records
    from .generation import generate_texts
    from .modeling import load_base_model

    records = printable_records(task, records)[:data_args.sample_generations]
    if not records:
        return
    spans = task.kind == "extractive"
    auto = AutoModelForQuestionAnswering if spans else AutoModelForSeq2SeqLM
    model = (auto.from_pretrained(adapter_dir) if whole_model else PeftModel.from_pretrained(
        load_base_model(model_args.model, qlora=model_args.qlora, span_head=spans), adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if spans:
        outputs = [a.answer(meta_threshold(adapter_dir)) for a in answer_records(
            model, tokenizer, records, data_args.max_source_length, data_args.doc_stride, data_args.max_answer_length)]
    else:
        outputs = generate_texts(model, tokenizer, [task.source(r) for r in records],
                                 max_source_length=data_args.max_source_length,
                                 max_new_tokens=data_args.max_target_length)
    print(f"\nsample {'answers' if spans else 'generations'} from the reloaded {'model' if whole_model else 'adapter'} "
          f"({adapter_dir}):")
    for record, output in zip(records, outputs):
        print(f"  Q: {record['question']}\n     reference: {' | '.join(task.references(record)) or task.empty_output}"
              f"\n     generated: {shown(task, task.answer_from_output(output))}")


def meta_threshold(folder: Path) -> float:
    """The no-answer threshold the run found best on validation (peft_t5.json's na_threshold), else 0."""
    meta = json.loads((folder / "peft_t5.json").read_text(encoding="utf-8"))
    return meta.get("na_threshold") or 0.0


def printable_records(task, records: list[dict]) -> list[dict]:
    """The records a log may print: those the task's word filter passes (the real jokes data has offensive ones)."""
    return [r for r in records if task.printable(" ".join([task.source(r), *task.references(r)]))]


def shown(task, text: str) -> str:
    if not text:
        return task.empty_output
    return text if task.printable(text) else "(hidden: the word filter flags it)"
