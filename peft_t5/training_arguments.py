"""Seq2SeqTrainingArguments with T5-minded defaults (imported on first use: it pulls in transformers' Trainer)."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from .arguments import TRAINER_NUMBERS, check_trainer_numbers
from .errors import PeftT5Error


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with T5-minded defaults; every Trainer flag still works."""

    _argument_group_name = "training (every Seq2SeqTrainingArguments flag)"

    output_dir: str | None = field(default=None, metadata={"help": "Where the adapter goes. Default: adapters/<task>."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an adapter already in output_dir."})
    resume: bool = field(default=False, metadata={"help": "Resume from the latest checkpoint in output_dir."})
    optim: OptimizerNames | str = field(default="adafactor", metadata={"help": "adafactor (T5's usual, fixed lr) or any Trainer optimizer, e.g. adamw_torch."})
    learning_rate: float = field(default=1e-3, metadata={"help": "1e-3 suits Adafactor on T5; use ~3e-4 with AdamW."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (or set --max_steps)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Batch size per device for evaluation."})
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={"help": "Adafactor on T5 runs at a fixed learning rate."})
    eval_strategy: IntervalStrategy | str | None = field(default=None, metadata={
        "help": "When to evaluate: no, steps or epoch. Default: as --save_strategy, else epoch."})
    save_strategy: SaveStrategy | str | None = field(default=None, metadata={
        "help": "When to checkpoint: no, steps, epoch or best. Default: as --eval_strategy (the best adapter is "
                "picked among checkpoints, so they come with evaluations), else epoch."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate the untrained adapter first, for a before/after."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Every trainable weight of every method gets a gradient each step, so DDP need not search (which "
                "costs a graph traversal a step, and warns that it found nothing)."})
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Keep NaN/inf losses visible (the run stops on them)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the adapter with the best validation loss."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "The metric that picks the best adapter."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, or another integration."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "group_by_length batches similar lengths: less padding."})
    max_tokens_per_batch: str = field(default="auto", metadata={
        "help": "Batches by tokens: at most N padded source + target tokens a batch, length-grouped (so a batch of "
                "short examples holds many). auto: on a GPU, from its free memory and the model's size; on a CPU, "
                "off. 0: off, batches of --per_device_train_batch_size examples."})

    def __post_init__(self):
        import torch

        if self.max_tokens_per_batch != "auto" and not (str(self.max_tokens_per_batch).isdigit()):
            raise PeftT5Error(f"--max_tokens_per_batch {self.max_tokens_per_batch}: expected auto, 0 or a number of tokens")

        check_trainer_numbers({name: getattr(self, name) for name in TRAINER_NUMBERS})
        self.output_dir_given = self.output_dir is not None  # the parent fills in "trainer_output"
        self.follow_strategies()
        if not torch.accelerator.is_available():
            # without it, processes started by torchrun/accelerate on a CPU machine each train alone (no gloo group)
            self.use_cpu = True
        super().__post_init__()

    def follow_strategies(self) -> None:
        """--load_best_model_at_end (on by default) needs a checkpoint at every evaluation: the strategy the user did
        not set follows the one they did, steps included."""
        evaluate, save = (str(getattr(v, "value", v)) if v is not None else None
                          for v in (self.eval_strategy, self.save_strategy))
        if evaluate is None and save in ("steps", "epoch", "no"):
            self.eval_strategy, self.eval_steps = save, self.eval_steps or self.save_steps
        elif save is None and evaluate in ("steps", "epoch", "no"):
            self.save_strategy = evaluate
            if evaluate == "steps" and self.save_steps == 500:  # the Trainer's default: save with each evaluation
                self.save_steps = self.eval_steps or self.logging_steps
        self.eval_strategy = self.eval_strategy or "epoch"
        self.save_strategy = self.save_strategy or "epoch"
