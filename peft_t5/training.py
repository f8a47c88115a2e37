"""Training with the HF Seq2SeqTrainer: the task's generation metric at each evaluation, a loss-curve PNG at the end."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from transformers import Seq2SeqTrainer, TrainerCallback

from .data import seq2seq_collator
from .errors import PeftT5Error
from .generation import generate_texts
from .tasks import Task

logger = logging.getLogger(__name__)


class TaskTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose evaluation adds the task's generation metric, on a bounded set of validation records."""

    def __init__(self, *args, task: Task, generation_records: list[dict], max_source_length: int = 512,
                 max_new_tokens: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.task, self.generation_records = task, generation_records
        self.max_source_length, self.max_new_tokens = max_source_length, max_new_tokens

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs) -> dict:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        if self.generation_records:
            scores = {f"{metric_key_prefix}_{k}": v for k, v in self.generation_scores(self.generation_records).items()}
            self.log(scores)
            metrics.update(scores)
        return metrics

    def generation_scores(self, records: list[dict]) -> dict[str, float]:
        outputs = generate_texts(self.model, self.processing_class, [self.task.source(r) for r in records],
                                 batch_size=self.args.per_device_eval_batch_size,
                                 max_source_length=self.max_source_length, max_new_tokens=self.max_new_tokens)
        answers = [self.task.answer_from_output(o) for o in outputs]
        return self.task.scores(answers, [self.task.references(r) for r in records])


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops the run at the first NaN or infinite training loss; the last good checkpoint stays on disk."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise PeftT5Error(f"training loss became {loss} at step {state.global_step}; the last good checkpoint "
                              f"is kept in {args.output_dir}; lower --learning_rate, or use float32 instead of bf16")


def plot_loss_curves(log_history: list[dict], path: Path) -> None:
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
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_trainer(model, tokenizer, task: Task, train_dataset, eval_dataset, training_args,
                  generation_records: list[dict], max_source_length: int, max_target_length: int) -> TaskTrainer:
    return TaskTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=seq2seq_collator(tokenizer, model),
        processing_class=tokenizer,
        callbacks=[StopOnNonFiniteLoss()],
        task=task,
        generation_records=generation_records,
        max_source_length=max_source_length,
        max_new_tokens=max_target_length,
    )
