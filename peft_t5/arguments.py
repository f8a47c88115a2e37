"""Training's settings as dataclasses, parsed by HfArgumentParser from flags, a JSON/YAML file or keywords. These
three import no torch, so settings are checked at once; TrainingArguments (training_arguments.py) pulls in
transformers' Trainer, PEFT and bitsandbytes (~10 s) and is imported on first use. Also the helpers every command's
flags share: config files, the closest real name to a typo, a parser that raises PeftT5Error."""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PeftT5Error
from .methods import INIT_LORA_WEIGHTS, METHOD_FLAGS, TRAINABLE
from .tasks import task_names

CONFIG_FILES = (".yaml", ".yml", ".json")  # a first argument ending so is a config file of flags


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
    doc_stride: int | None = field(default=None, metadata={
        "help": "squad_extractive: tokens shared by the windows a long context is split into, under half of "
                "max_source_length (default: 128, or a quarter of max_source_length where that is less)."})
    max_answer_length: int = field(default=30, metadata={"help": "squad_extractive: longest answer span, in tokens."})
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
        "help": "lora, dora, ia3, adalora, prompt_tuning or vera (default lora), or full: every weight trains "
                "(the baseline; saves a whole model).",
        "choices": list(TRAINABLE)})
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
    layers: str | None = field(default=None, metadata={
        "help": "The T5 blocks that train (all methods but prompt_tuning): encoder, decoder, or block ranges in one, "
                "e.g. encoder:0-5 or decoder:4-5,encoder:5; full freezes every other block (default: all)."})
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


def own_flags() -> list[str]:
    """The flags peft-t5 itself adds (not the Trainer's)."""
    import dataclasses

    return [f.name for dc in (ModelArguments, DataArguments, LoraArguments) for f in dataclasses.fields(dc)]


def all_flags() -> set[str]:
    """Every flag train takes: its own, and the Trainer's (trainer_fields). Empty where the Trainer's source cannot
    be read."""
    trainer = trainer_fields()
    return {*own_flags(), "help", *trainer} if trainer else set()


@functools.lru_cache(maxsize=1)
def trainer_fields() -> dict[str, str]:
    """The fields of peft-t5's TrainingArguments and the transformers classes it extends, with their help (ours
    first), read from their source without importing them (~10 s, torch included). Empty where it cannot be read."""
    import ast
    import importlib.util

    try:  # the packages' folders, found without importing them
        transformers = Path(importlib.util.find_spec("transformers").origin).parent
    except (AttributeError, ImportError, ValueError):
        return {}
    files = {Path(__file__).with_name("training_arguments.py"): "TrainingArguments",
             transformers / "training_args_seq2seq.py": "Seq2SeqTrainingArguments",
             transformers / "training_args.py": "TrainingArguments"}
    fields: dict[str, str] = {}
    for path, name in files.items():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            return {}
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
        if body is None:
            return {}
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    not node.target.id.startswith("_"):
                fields.setdefault(node.target.id, field_help(node.value))
    return fields


def field_help(value) -> str:
    """The help in a dataclass field's metadata, where it is a literal."""
    import ast

    for keyword in getattr(value, "keywords", []):
        if keyword.arg == "metadata":
            try:
                return str(ast.literal_eval(keyword.value).get("help", ""))
            except (ValueError, TypeError, SyntaxError, AttributeError):
                return ""
    return ""


def train_help() -> str:
    """train's --help, without the heavy imports: the toolkit's own flags first, then every Trainer flag."""
    from transformers.hf_argparser import HfArgumentParser

    from .train_settings import USAGE

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments), prog="peft-t5 train", usage=USAGE,
                              description="Train a LoRA/QLoRA adapter on a T5 base (also: python scripts/train_lora.py)."
                                          " A YAML/JSON file of these flags may come first; flags after it override it.")
    group = parser.add_argument_group("training (every Seq2SeqTrainingArguments flag)")
    for name, help_text in trainer_fields().items():
        group.add_argument(f"--{name}", metavar=name.upper(), help=help_text.replace("%", "%%"))
    return parser.format_help()


def method_flag_values(argv: list[str], defaults: dict) -> LoraArguments:
    """The PEFT method's flags alone, from `defaults` (a config file's, or keywords) and argv; the rest of argv is
    left to the full parse. argparse, not HfArgumentParser: importing transformers takes seconds, and this runs
    first. --method is checked by get_method, which names the closest method that trains."""
    import dataclasses
    import typing

    parser = FlagParser(prog="peft-t5 train", allow_abbrev=False, add_help=False)
    for f in dataclasses.fields(LoraArguments):
        kind = next(t for t in typing.get_args(typing.get_type_hints(LoraArguments)[f.name]) or
                    (typing.get_type_hints(LoraArguments)[f.name],) if t is not type(None))
        many = typing.get_origin(kind) is list
        parser.add_argument(f"--{f.name}", type=typing.get_args(kind)[0] if many else kind,
                            nargs="+" if many else None, default=f.default,
                            choices=None if f.name == "method" else f.metadata.get("choices"))
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in {f.name for f in dataclasses.fields(LoraArguments)}})
    return LoraArguments(**vars(parser.parse_known_args(argv)[0]))


def __getattr__(name: str):
    if name == "TrainingArguments":
        from .training_arguments import TrainingArguments

        return TrainingArguments
    raise AttributeError(name)


class FlagParser(argparse.ArgumentParser):
    """argparse, with its mistakes raised as one-line PeftT5Errors (not its usage block and SystemExit), so that the
    library never exits and the CLI prints one line; an unknown flag names the closest real one."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flag = next((a for a in message.split(": ", 1)[1].split() if a.startswith("-")), None)
            if flag:
                import difflib

                name = flag.split("=")[0]
                known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
                near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                message = f"{name}: unknown flag" + (f"; did you mean {near[0]}?" if near else "")
        raise PeftT5Error(f"{message}; {self.prog} --help lists the flags")


def normalized(argv: list[str], renamed: dict[str, str]) -> list[str]:
    """--flag-name as --flag_name; an old spelling refused, naming the new one."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("-", "_")
            if name in renamed:
                raise PeftT5Error(f"{name}: renamed {renamed[name]} (one name for one thing in every command); "
                                  f"pass {renamed[name]}")
            arg = name + eq + value
        out.append(arg)
    return out


def read_config(path: str) -> dict:
    """A YAML or JSON file of flag names and values."""
    import yaml

    if not Path(path).is_file():
        raise PeftT5Error(f"{path}: no such config file")
    try:
        text = Path(path).read_text(encoding="utf-8")
        config = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        kind = "JSON" if str(path).endswith(".json") else "YAML"
        raise PeftT5Error(f"{path}: not valid {kind} ({e})".replace("\n", " "))
    if not isinstance(config, dict):
        raise PeftT5Error(f"{path}: expected a mapping of flag names to values, e.g. task: jokes")
    return config


def convert(where: str, value: str, type_):
    """A setting given as text, as its flag's type ('where' names the file and key, or the keyword)."""
    try:
        return type_(value)
    except (TypeError, ValueError) as e:
        raise PeftT5Error(f"{where}: {value!r} is not valid ({e})")


def closest(name: str, known, prefix: str = "") -> str:
    """'; did you mean --X?': the closest flag, the toolkit's own counted a little closer than the Trainer's
    (--lora_rank is --lora_r, not --local_rank; --max_stpes is still --max_steps)."""
    import difflib

    own = set(own_flags())
    score = {k: difflib.SequenceMatcher(None, name, k).ratio() + 0.1 * (k in own) for k in known if k != "help"}
    best = max(score, key=score.get, default=None)
    return f"; did you mean {prefix}{best}?" if best and score[best] >= 0.6 + 0.1 * (best in own) else ""


TRAINER_NUMBERS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                   "eval_steps", "save_steps", "logging_steps", "max_steps")


def check_trainer_numbers(values: dict) -> None:
    """The Trainer's counts in range; values: name -> number, or None where not given. Checked before the heavy
    imports (from the flags) and again on the parsed arguments."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if values.get(name) is not None and values[name] < 1:
            raise PeftT5Error(f"--{name} {values[name]}: must be at least 1")
    for name in ("eval_steps", "save_steps", "logging_steps"):
        if values.get(name) is not None and values[name] <= 0:
            raise PeftT5Error(f"--{name} {values[name]:g}: must be more than 0 (a number of steps, or under 1 a share "
                              "of the run's steps)")
    steps = values.get("max_steps")
    if steps is not None and (steps == 0 or steps < -1):
        raise PeftT5Error(f"--max_steps {steps}: must be at least 1 (or -1, the default, to train "
                          "--num_train_epochs)")
