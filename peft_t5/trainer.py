"""Training with the HF Seq2SeqTrainer: the task's generation metric at each evaluation, a loss-curve PNG at the end."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import DataCollatorWithPadding, PrinterCallback, Seq2SeqTrainer, TrainerCallback
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from .batching import TokenBudgetBatchSampler
from .data import seq2seq_collator
from .errors import PeftT5Error
from .generation import generate_texts, no_answer_probs
from .optimizer import GroupedAdafactor
from .tasks import Task
from .throughput import ThroughputMeter

logger = logging.getLogger(__name__)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches whose order depends only on (seed, epoch).

    transformers' LengthGroupedSampler draws from the global RNG when iterated, so a run resumed from a
    checkpoint replays a different order than the run it continues; accelerate seeds only RandomSampler.
    """

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class TaskTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose evaluation adds the task's generation metric, on a bounded set of validation records;
    batches by tokens when given a budget; logs tokens/s and model FLOP utilisation."""

    def __init__(self, *args, task: Task, generation_records: list[dict], max_source_length: int = 512,
                 max_new_tokens: int = 64, max_tokens_per_batch: int | None = None, span_options: dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.task, self.generation_records, self.span_options = task, generation_records, span_options or {}
        self.max_source_length, self.max_new_tokens = max_source_length, max_new_tokens
        self.max_tokens_per_batch = max_tokens_per_batch
        self.throughput = ThroughputMeter(self.model, torch.bfloat16 if self.args.bf16 else torch.float32)

    def get_train_dataloader(self):
        dataset = self.train_dataset
        if not self.max_tokens_per_batch or not has_length(dataset):
            return super().get_train_dataloader()
        targets = [len(ids) for ids in dataset["labels"]] if "labels" in dataset.column_names else [0] * len(dataset)
        sampler = TokenBudgetBatchSampler(dataset["length"], targets,
                                          self.max_tokens_per_batch, seed=self.args.seed,
                                          count_multiple_of=self.args.world_size * self.args.gradient_accumulation_steps)
        loader = torch.utils.data.DataLoader(
            self._remove_unused_columns(dataset, description="Training"), batch_sampler=sampler,
            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor)
        return self.accelerator.prepare(loader)  # process i takes batches i, i + N, ... of the same list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        weight = adalora_penalty_weight(self.model)
        if not weight or not model.training:
            return result
        # the loss of every micro-batch is summed (not averaged) over accumulation: the penalty counts once a step
        penalty = weight * adalora_orthogonality(self.model) / getattr(self, "current_gradient_accumulation_steps", 1)
        return (result[0] + penalty, result[1]) if return_outputs else result + penalty

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.throughput.count(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the throughput since the last one
            logs.update(self.throughput.read())
        super().log(logs, start_time)

    def _run_epoch(self, *args, **kwargs):
        # transformers takes a step before it checks max_steps, so a run resumed from its last checkpoint trained
        # one step past --max_steps at every resume
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.throughput.pause(time.perf_counter() - started)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        if self.args.train_sampling_strategy != "group_by_length" or "input_ids" not in columns:
            return super()._get_train_sampler(train_dataset)
        lengths = dataset["length"] if "length" in columns else [len(ids) for ids in dataset["input_ids"]]
        # grouped by the global batch: accelerate hands consecutive per-device batches to the processes, so
        # N processes see the same records in a step as one process with N times the batch
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return SeededLengthGroupedSampler(global_batch, lengths=lengths, seed=self.args.seed)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs) -> dict:
        started = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        if self.generation_records:
            scores = self.span_scores if self.task.kind == "extractive" else self.generation_scores
            scores = {f"{metric_key_prefix}_{k}": v for k, v in scores(self.generation_records).items()}
            self.log(scores)
            metrics.update(scores)
        self.throughput.pause(time.perf_counter() - started)
        return metrics

    def span_scores(self, records: list[dict]) -> dict[str, float]:
        """Extractive QA: each process answers its share of the records by span; all score the gathered answers."""
        from .extractive import answer_records, extractive_scores

        with self.accelerator.split_between_processes(records, apply_padding=True) as shard:
            spans = answer_records(self.model, self.processing_class, shard, self.max_source_length,
                                   batch_size=self.args.per_device_eval_batch_size, **self.span_options)
        return extractive_scores(records, gather_object(spans)[:len(records)])

    def generation_scores(self, records: list[dict]) -> dict[str, float]:
        """Each process generates its share of the records; all of them score the gathered outputs. A task with
        a no-answer target also gets the official best_f1 and its no-answer threshold."""
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # parameters split across processes
        options = dict(batch_size=self.args.per_device_eval_batch_size, max_source_length=self.max_source_length)
        with self.accelerator.split_between_processes(records, apply_padding=True) as shard:
            sources = [self.task.source(r) for r in shard]
            outputs = generate_texts(self.model, self.processing_class, sources, max_new_tokens=self.max_new_tokens,
                                     **options, **({"synced_gpus": True} if sharded else {}))
            na = (no_answer_probs(self.model, self.processing_class, sources, outputs, self.task.no_answer,
                                  max_new_tokens=self.max_new_tokens, **options)
                  if self.task.no_answer and not sharded else None)
        outputs = gather_object(outputs)[:len(records)]  # drops the padding of the last share
        answers = [self.task.answer_from_output(o) for o in outputs]
        references = [self.task.references(r) for r in records]
        if na is None:
            return self.task.scores(answers, references)
        return self.task.scores(answers, references, na_probs=gather_object(na)[:len(records)])


def target_token_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over target tokens, divided by the target tokens of the whole step.

    T5 computes a per-batch mean and ignores num_items_in_batch, yet the Trainer multiplies the loss by the
    number of processes as if it did not; with this loss N processes (and gradient accumulation) give the
    gradient of one big batch.
    """
    return ForMaskedLMLoss(outputs.logits, labels, vocab_size=outputs.logits.shape[-1],
                           num_items_in_batch=num_items_in_batch)


def adalora_penalty_weight(model) -> float:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "orth_reg_weight", 0.0) if getattr(model, "peft_type", None) == "ADALORA" else 0.0


def adalora_orthogonality(model, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's penalty on P and Q drifting from orthogonal: the mean over its layers of ||PP^T - I|| and
    ||Q^TQ - I||. PEFT adds it to the loss inside the model's forward, but only to a loss the model computes, and
    peft-t5 computes its token loss outside (target_token_loss); so it is added here, as PEFT computes it."""
    terms = []
    for name, p in model.named_parameters():
        if name.endswith(f".lora_A.{adapter}") or name.endswith(f".lora_B.{adapter}"):
            if p.numel():  # a shard left empty on this process (FSDP / ZeRO-3) adds nothing here
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops the run at the first NaN or infinite loss, before a checkpoint can store it.

    A non-finite loss makes the gradients, then the adapter weights, non-finite. After every step the norm
    of the adapter weights is checked on the device, and the first bad step recorded there; the host reads
    that flag only when the step logs, evaluates or saves (or training ends), so steps in between never wait
    for the device.
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.first_bad_step = None

    def _stop(self, args, step: int, what: str):
        from .outputs import newest_whole_checkpoint

        last = newest_whole_checkpoint(args.output_dir)
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved before it"
        raise PeftT5Error(f"{what} at step {step}; stopped, {kept}; lower --learning_rate, or train in float32 "
                          "instead of bf16")

    def on_step_end(self, args, state, control, **kwargs):
        norm = torch.nn.utils.get_total_norm(self.params, error_if_nonfinite=False)
        if self.first_bad_step is None:
            self.first_bad_step = torch.zeros((), dtype=torch.int64, device=norm.device)
        bad = ~torch.isfinite(norm) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(bad, state.global_step, self.first_bad_step)
        # the DefaultFlowCallback ran first, so these already say what follows this step
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop \
                or state.global_step >= state.max_steps:
            step = int(self.first_bad_step)
            if step:
                self._stop(args, step, "the loss diverged (adapter weights became NaN or infinite)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(args, state.global_step, f"the training loss became {loss}")


class StepBoundary(TrainerCallback):
    """Whether the model is between two optimizer steps (logging, evaluating, saving): a Ctrl-C there leaves whole
    weights that a checkpoint can keep; one inside a step may leave them half updated.
    Within `noting_ctrl_c()`, a Ctrl-C is also noted and raised again at the end of the step: Python drops a
    KeyboardInterrupt raised while a destructor or a garbage-collector callback runs ("Exception ignored in ..."),
    and training would go on as if Ctrl-C had not been pressed."""
    between = True
    pressed = False

    @contextmanager
    def noting_ctrl_c(self):
        if threading.current_thread() is not threading.main_thread() or (
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # e.g. ignored in a background job
            yield
            return

        def on_ctrl_c(signum, frame):
            self.pressed = True
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step_begin(self, args, state, control, **kwargs):
        self.between = False

    def on_step_end(self, args, state, control, **kwargs):
        self.between = True
        if self.pressed:
            raise KeyboardInterrupt


class AdaLoraRankBudget(TrainerCallback):
    """AdaLoRA moves rank between layers by the gradients' sensitivity: after each optimizer step, before the
    gradients are zeroed (PEFT's update_and_allocate), as its training loop needs."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


class ThroughputClock(TrainerCallback):
    """Starts the throughput meter when training starts, on the training device."""

    def __init__(self, meter: ThroughputMeter):
        self.meter = meter

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.meter.start(args.device)

    def on_train_end(self, args, state, control, **kwargs):
        self.meter.finish()  # the steps since the last logging step (all of them in a run shorter than one)


class ProgressLines(TrainerCallback):
    """Where there are no progress bars (output to a file), one plain line per logging step:
    `step 120/600 (20%) · 1.8 s/step · ~14 min left · loss 2.31 · lr 0.001`, a line per evaluation, and one at the end."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step  # a resumed run counts from there

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero:
            return
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            per_step = (time.perf_counter() - self.started) / max(step - self.first_step, 1)
            left = per_step * max(total - step, 0)
            said = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)", f"{per_step:.2f} s/step",
                    f"~{left / 60:.0f} min left" if left >= 90 else f"~{left:.0f} s left", f"loss {logs['loss']:.4g}"]
            said += [f"lr {logs['learning_rate']:.3g}"] if "learning_rate" in logs else []
            said += [f"{logs['tokens_per_s']:,.0f} tokens/s"] if "tokens_per_s" in logs else []
            print(" · ".join(said), flush=True)
        elif any(key.startswith("eval_") for key in logs):
            shown = [f"{key} {value:.4g}" for key, value in logs.items() if key.startswith("eval_")
                     and not key.endswith(("runtime", "per_second")) and isinstance(value, (int, float))]
            print(f"evaluation at step {step}: " + " · ".join(shown), flush=True)
        elif "train_runtime" in logs:
            print(f"trained to step {step} in {logs['train_runtime']:.0f} s", flush=True)


def gathered_state_dict(model, accelerator=None) -> dict | None:
    """The whole model's state dict, full tensors on the CPU, where training sharded the parameters (FSDP 1 or
    2, DeepSpeed ZeRO-3); None where nothing is sharded. Every process must call it (it gathers)."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)  # the engine; under ZeRO-3 this gathers the 16-bit weights
    fsdp2 = any(isinstance(p, DTensor) for p in model.parameters())
    if not (fsdp2 or isinstance(model, FullyShardedDataParallel)):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plot_loss_curves(log_history: list[dict], path: Path, title: str | None = None) -> None:
    """Training and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "training"), ("eval_loss", "validation")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_trainer(model, tokenizer, task: Task, train_dataset, eval_dataset, training_args,
                  generation_records: list[dict], max_source_length: int, max_target_length: int,
                  max_tokens_per_batch: int | None = None, loraplus_lr_ratio: float | None = None,
                  span_options: dict | None = None) -> TaskTrainer:
    """The Trainer of a task; an extractive task's model computes its own span loss from start/end positions."""
    if torch.cuda.is_available():
        # cuDNN's attention builds a new plan for every new sequence length, ~40 ms a call on an H100 (measured);
        # dynamic padding changes the length every batch. The other SDPA kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    trainer = TaskTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if task.kind == "extractive" else
        seq2seq_collator(tokenizer, model),
        compute_loss_func=None if task.kind == "extractive" else target_token_loss,
        processing_class=tokenizer,
        callbacks=[StopOnNonFiniteLoss(model), StepBoundary()],
        task=task,
        generation_records=generation_records,
        max_source_length=max_source_length,
        max_new_tokens=max_target_length,
        max_tokens_per_batch=max_tokens_per_batch,
        span_options=span_options,
    )
    trainer.add_callback(ThroughputClock(trainer.throughput))
    if training_args.disable_tqdm:  # a log file: a plain line per logging step, not the logs' dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines())
    if getattr(model, "peft_type", None) == "ADALORA":
        trainer.add_callback(AdaLoraRankBudget(model))
    trainer.optimizer_cls_and_kwargs = optimizer_for(training_args)  # Seq2SeqTrainer's __init__ does not pass it on
    if loraplus_lr_ratio:  # LoRA+: B learns loraplus_lr_ratio times faster than A, in the optimizer the run uses
        from peft.optimizers import create_loraplus_optimizer

        cls, kwargs = trainer.optimizer_cls_and_kwargs or Seq2SeqTrainer.get_optimizer_cls_and_kwargs(training_args, model)
        trainer.optimizer = create_loraplus_optimizer(model, cls, lr=training_args.learning_rate,
                                                      loraplus_lr_ratio=loraplus_lr_ratio,
                                                      **{k: v for k, v in kwargs.items() if k != "lr"})
    return trainer


def launched_with(kind: str) -> bool:
    """Whether `accelerate launch` asked for FSDP or DEEPSPEED: it says so in the processes' environment."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def optimizer_for(training_args) -> tuple[type, dict] | None:
    """Adafactor with T5's settings as GroupedAdafactor (one step per tensor shape, not per tensor); None leaves
    the Trainer's own choice (other optimizers, optim_args, and sharded runs whose parameters are DTensors)."""
    sharded = bool(training_args.fsdp or training_args.deepspeed) or launched_with("FSDP") or launched_with("DEEPSPEED")
    if training_args.optim != "adafactor" or training_args.optim_args or sharded:
        return None
    return GroupedAdafactor, {"lr": training_args.learning_rate}
