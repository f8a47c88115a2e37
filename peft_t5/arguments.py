"""Command-line arguments as dataclasses, parsed by HfArgumentParser (flags, or one JSON/YAML file)."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from .errors import PeftT5Error
from .methods import INIT_LORA_WEIGHTS, METHOD_FLAGS, METHODS, REFUSED
from .tasks import task_names


@dataclass
class ModelArguments:
    _argument_group_name = "the base model"

    model: str | None = field(default=None, metadata={
        "help": "Hub id, local folder, or 'tiny' (a small random-init T5 that needs no network). "
                "Default: the task's base (squad: t5-small, jokes: google/flan-t5-large)."})
    qlora: bool = field(default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes) and train LoRA on it."})
    trust_pickle: bool = field(default=False, metadata={"help": "Allow pickled .bin weights (they can run code when loaded)."})


@dataclass
class DataArguments:
    _argument_group_name = "task and data"

    task: str = field(metadata={"help": "The task to train.", "choices": task_names()})
    data: str | None = field(default=None, metadata={
        "help": "A local data file or a Hub dataset id. Default: the task's Hub set (squad), the bundled "
                "sample (jokes, and any task with --model tiny)."})
    validation_data: str | None = field(default=None, metadata={"help": "A separate validation file (squad)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share held out for validation (squad: by article)."})
    test_fraction: float = field(default=0.05, metadata={"help": "Share held out for testing (jokes)."})
    max_question_words: int = field(default=40, metadata={"help": "jokes: longest question kept, in words."})
    max_answer_words: int = field(default=25, metadata={"help": "jokes: longest punchline kept, in words."})
    max_source_length: int = field(default=512, metadata={"help": "Source tokens; squad cuts the context, never the question."})
    max_target_length: int = field(default=64, metadata={"help": "Target tokens, and new tokens at generation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    generation_eval_samples: int = field(default=64, metadata={"help": "Validation records scored by generation at each evaluation."})
    streaming: bool = field(default=False, metadata={
        "help": "Read --data lazily with datasets streaming, for data larger than memory; needs --max_steps. "
                "The first --max_eval_samples records (default 500) of --validation_data, or else of --data, "
                "are the validation set."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "--streaming: records shuffled in memory at a time."})
    sample_generations: int = field(default=5, metadata={"help": "Generations printed from the reloaded adapter at the end."})


@dataclass
class LoraArguments:
    """The PEFT method and its flags. Unset flags are None: the method's own defaults fill them (methods.DEFAULTS),
    and a flag of another method is refused."""

    _argument_group_name = "PEFT method"

    method: str = field(default="lora", metadata={
        "help": "lora, dora, ia3, adalora, prompt_tuning or vera (default lora).",
        "choices": [*METHODS, *REFUSED]})
    lora_r: int | None = field(default=None, metadata={"help": "lora, dora, vera: the rank (16; vera's shared "
                                                               "matrices take 16 too)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "lora, dora, adalora: scaling numerator (32; "
                                                                   "scale = alpha / r)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "lora, dora, adalora, vera: dropout on the "
                                                                       "adapter's input, in [0, 1) (0.05)."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "lora, dora, adalora, vera: module names to adapt (T5: q k v o wi wo wi_0 wi_1), or all-linear "
                "(default: q v)."})
    init_lora_weights: str | None = field(default=None, metadata={
        "help": "lora, dora: default (B = 0), gaussian, pissa or olora (start from the weights' principal or "
                "orthonormal directions).", "choices": list(INIT_LORA_WEIGHTS)})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "lora, dora: LoRA+, B's learning rate is this many times A's (e.g. 16)."})
    num_virtual_tokens: int | None = field(default=None, metadata={"help": "prompt_tuning: soft prompt length (20)."})
    init_r: int | None = field(default=None, metadata={"help": "adalora: starting rank of each layer (12)."})
    target_r: int | None = field(default=None, metadata={"help": "adalora: average rank it ends with (4)."})
    tinit: float | None = field(default=None, metadata={"help": "adalora: share of the steps before ranks are "
                                                                "pruned (0.1)."})
    tfinal: float | None = field(default=None, metadata={"help": "adalora: share of the steps at the end with ranks "
                                                                 "fixed (0.3)."})
    deltaT: int | None = field(default=None, metadata={"help": "adalora: steps between reallocations (1)."})
    orth_reg_weight: float | None = field(default=None, metadata={
        "help": "adalora: weight of the penalty that keeps P and Q orthogonal (0.5; 0: none)."})

    def given(self) -> dict:
        return {flag: getattr(self, flag) for flag in METHOD_FLAGS}


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

        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise PeftT5Error(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise PeftT5Error(f"--max_steps {self.max_steps}: must be at least 1 (or -1, the default, to train "
                              "--num_train_epochs)")
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
