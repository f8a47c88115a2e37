"""`peft-t5 train` (scripts/train_lora.py): the whole train job, top to bottom: parse, check, data, model,
trainer, save, samples."""
from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from ..errors import Interrupted, PeftT5Error
from ..methods import get_method
from ..outputs import (checkpoint_problem, checkpoints_newest_first, newest_whole_checkpoint, output_lock,
                       saving_into)

logger = logging.getLogger(__name__)
CONFIG_FILES = (".yaml", ".yml", ".json")  # a first argument ending so is a config file of flags


def parse_train_args(argv: list[str]):
    """Flags, or a YAML/JSON config file first with flags after it that override it. Misspelled or prefixed
    flags and unknown config keys are refused, naming the closest real flag."""
    from transformers import HfArgumentParser

    from ..arguments import DataArguments, LoraArguments, ModelArguments, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments),
                              prog="peft-t5 train", description="Train a LoRA/QLoRA adapter on a T5 base (also: "
                              "python scripts/train_lora.py).",
                              usage="peft-t5 train [CONFIG.yaml|json] --task {jokes,squad} [--model M] [--data FILE] "
                                    "[--lora_r R] [any Seq2SeqTrainingArguments flag]",
                              allow_abbrev=False)
    known = {a.dest: a for a in parser._actions}
    if argv and argv[0].endswith(CONFIG_FILES):
        path, argv = argv[0], argv[1:]
        config = read_config(path)
        for key in config:
            if key not in known:
                raise PeftT5Error(f"{path}: unknown key '{key}'{closest(key, known)}")
            action = known[key]
            action.required = False
            if isinstance(config[key], str) and callable(action.type):  # YAML reads 3e-4 as a string
                config[key] = convert(path, key, config[key], action.type)
        parser.set_defaults(**config)
    try:
        *dataclasses, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # the Trainer's own checks of its arguments, e.g. strategies that do not match
        raise PeftT5Error(f"training arguments: {' '.join(str(e).split())}; see train_lora.py --help")
    if rest:
        flag = next((a for a in rest if a.startswith("-")), rest[0])
        name = flag.lstrip("-").split("=")[0]
        raise PeftT5Error(f"{flag}: unknown flag{closest(name, known, prefix='--')}; train_lora.py --help lists them")
    return dataclasses


def read_config(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise PeftT5Error(f"{path}: no such config file")
    try:
        text = Path(path).read_text(encoding="utf-8")
        config = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise PeftT5Error(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({e})".replace("\n", " "))
    if not isinstance(config, dict):
        raise PeftT5Error(f"{path}: expected a mapping of flag names to values, e.g. task: jokes")
    return config


def convert(path: str, key: str, value: str, type_):
    try:
        return type_(value)
    except (TypeError, ValueError) as e:
        raise PeftT5Error(f"{path}: {key}: {value!r} is not valid ({e})")


def closest(name: str, known, prefix: str = "") -> str:
    """'; did you mean --X?': the closest flag, the toolkit's own counted a little closer than the Trainer's
    (--lora_rank is --lora_r, not --local_rank; --max_stpes is still --max_steps)."""
    import difflib

    from ..arguments import own_flags

    own = set(own_flags())
    score = {k: difflib.SequenceMatcher(None, name, k).ratio() + 0.1 * (k in own) for k in known if k != "help"}
    best = max(score, key=score.get, default=None)
    return f"; did you mean {prefix}{best}?" if best and score[best] >= 0.6 + 0.1 * (best in own) else ""


PRECHECKED = ("task", "model", "data", "validation_data", "output_dir")
SWITCHES = ("overwrite_output_dir", "resume", "streaming", "qlora")  # flags that may stand alone (true)


def split_config(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """(the config file, its flags, the flags after it): a first argument ending .yaml/.yml/.json is a config file."""
    if argv and argv[0].endswith(CONFIG_FILES):
        return argv[0], read_config(argv[0]), argv[1:]
    return None, {}, argv


def flag_values(config: dict, argv: list[str]) -> dict:
    """The values of the PRECHECKED flags and SWITCHES, from a config file's flags and the flags after it."""
    values = {k: str(v) for k, v in config.items() if k in (*PRECHECKED, *SWITCHES) and v is not None}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else None
        if name.startswith("--") and name[2:] in SWITCHES:
            is_value = following is not None and following.lower() in ("true", "false", "1", "0")
            values[name[2:]] = value if eq else following if is_value else "true"
        elif name.startswith("--") and name[2:] in PRECHECKED and (eq or following is not None):
            values[name[2:]] = value if eq else following
    return values


def precheck_train(argv: list[str]) -> None:
    """Check every flag's name, the method's settings, the task, the data files' layout and the output folder
    before the heavy imports (transformers' training arguments pull in PEFT and bitsandbytes: ~10 s), so that a
    mistake is reported at once; the full parse after them checks the rest."""
    from ..adapters import check_writable_folder
    from ..hub import model_problem
    from ..tasks import get_task
    from ..tasks.registry import looks_like_hub_id

    path, config, flags = split_config(argv)  # the file is read once for all the checks below
    values = flag_values(config, flags)
    task = get_task(values["task"]) if "task" in values else None
    for key in ("data", "validation_data"):
        path = values.get(key)
        if path and not looks_like_hub_id(path):
            if not Path(path).exists():
                raise PeftT5Error(f"{path}: no such file; pass --{key} with a local data file or a Hub dataset id")
            if task and values.get("streaming", "false").lower() not in ("true", "1"):
                task.check_layout(path)
    if "output_dir" in values:
        check_writable_folder(values["output_dir"], "--output_dir")
    check_flag_names(path, config, flags)
    method = check_method_settings(config, flags)
    if method.whole_model and values.get("qlora", "false").lower() in ("true", "1"):
        raise PeftT5Error(f"--qlora with --method {method.name}: a 4-bit base cannot train its own weights (QLoRA "
                          "trains an adapter on a frozen 4-bit base); drop --qlora, or choose a PEFT --method")
    if task:
        on = {k: values.get(k, "false").lower() in ("true", "1") for k in SWITCHES}
        check_output_dir(Path(values.get("output_dir") or f"adapters/{task.name}"), on["overwrite_output_dir"],
                         on["resume"] or "resume_from_checkpoint" in config or
                         any(a.startswith("--resume_from_checkpoint") for a in flags))
    model = values.get("model") or (task.default_model if task else None)
    problem = model_problem(model) if model else None
    if problem:
        given = "--model" if "model" in values else f"the {task.name} task's base model (--model to choose another)"
        raise PeftT5Error(f"{given}: {problem}")


def check_flag_names(path: str | None, config: dict, argv: list[str]) -> None:
    """A misspelled flag or config key, refused before the Trainer's arguments are imported."""
    from ..arguments import all_flags

    known = all_flags()
    if not known:  # transformers' source could not be read: the full parse refuses it, later
        return
    names = [(f"{path}: unknown key '{key}'", key) for key in config]
    names += [(f"{arg.split('=')[0]}: unknown flag", arg[2:].split("=")[0]) for arg in argv if arg.startswith("--")]
    for said, name in names:
        if name not in known and name.removeprefix("no_") not in known:
            raise PeftT5Error(said + closest(name, known, "--" if said.endswith("flag") else "") +
                              ("; train_lora.py --help lists them" if said.endswith("flag") else ""))


def check_method_settings(config: dict, argv: list[str]):
    """The PEFT method's flags in range (--lora_r 0, --lora_dropout 1.5), from a parse of those flags alone."""
    from ..arguments import method_flag_values

    try:
        lora = method_flag_values(argv, config)
    except SystemExit:  # argparse said what is wrong with a value (e.g. --lora_r x) in its own words
        raise PeftT5Error("a PEFT method flag has a value of the wrong type (see above); train_lora.py --help "
                          "lists the flags") from None
    method = get_method(lora.method)
    method.settings(lora.given())
    return method


def resolve_defaults(task, model_args, data_args, training_args) -> None:
    from ..modeling import TINY
    from ..training import launched_with

    model_args.model = model_args.model or task.default_model
    if data_args.data is None:
        data_args.data = task.default_data if model_args.model != TINY else task.sample
    if not training_args.output_dir_given:
        training_args.output_dir = f"adapters/{task.name}"
    import torch

    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; only warns on a CPU
    if data_args.streaming:
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy

        # a stream has no epochs: evaluate and checkpoint five times over --max_steps instead
        if training_args.eval_strategy == IntervalStrategy.EPOCH:
            training_args.eval_strategy, training_args.eval_steps = IntervalStrategy.STEPS, 0.2
        if training_args.save_strategy == SaveStrategy.EPOCH:
            training_args.save_strategy, training_args.save_steps = SaveStrategy.STEPS, 0.2
        # each process reads the stream and keeps its share of every global batch; dispatching batches from
        # the main process (accelerate's default for streams) cannot send batches padded to different lengths
        training_args.accelerator_config.dispatch_batches = False
    if training_args.bf16 and not torch.cuda.is_available():
        from ..modeling import bf16_supported

        if not bf16_supported():
            logger.warning("--bf16 on this CPU (no AVX512-BF16 or AMX units) runs several times slower than "
                           "float32; leave --bf16 off here")
    if launched_with("FSDP") and not torch.cuda.is_available():
        # accelerate would run these processes as plain DDP over gloo, without a word, sharding nothing
        raise PeftT5Error("the accelerate config asks for FSDP, which accelerate runs only on GPUs; on a CPU "
                          "it would train unsharded, so use configs/accelerate/ddp-cpu.yaml here")
    if launched_with("DEEPSPEED") and training_args.optim == "adafactor":
        # measured: 0.011 apart from the 1-process adapter after 4 steps, against 3e-6 with AdamW
        raise PeftT5Error("--optim adafactor under DeepSpeed: ZeRO hands the optimizer flat partitions, so Adafactor "
                          "loses the factored statistics T5's recipe relies on and trains a different adapter; pass "
                          "--optim adamw_torch --learning_rate 3e-4")
    if training_args.fp16:
        raise PeftT5Error("--fp16 is refused for T5: its activations overflow in float16 (NaN or zero loss); "
                          "use --bf16 on hardware that has it, or float32 (the default)")


def check_output_dir(adapter_dir: Path, overwrite: bool, resume: bool) -> None:
    """An adapter is replaced only with --overwrite_output_dir, and files peft-t5 did not write are never replaced:
    a folder holding them is refused without the flag, and with it they stay beside the adapter."""
    from ..adapters import ADAPTER_OWNS, MODEL_OWNS, check_writable_folder, foreign_files, is_adapter_dir, is_model_dir

    check_writable_folder(adapter_dir, "--output_dir")
    if (is_adapter_dir(adapter_dir) or is_model_dir(adapter_dir)) and not (overwrite or resume):
        held = "an adapter" if is_adapter_dir(adapter_dir) else "a model"
        raise PeftT5Error(f"{adapter_dir} already holds {held}; pass --overwrite_output_dir to replace it, "
                          "or --output_dir for another folder")
    foreign = foreign_files(adapter_dir, (*ADAPTER_OWNS, *MODEL_OWNS))
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PeftT5Error(f"--output_dir {adapter_dir} holds files peft-t5 did not write ({shown}); pass a new or "
                          "empty folder, or --overwrite_output_dir to save the adapter beside them (they are kept)")


def resume_checkpoint(training_args, say) -> str | None:
    """The checkpoint to continue from: --resume_from_checkpoint, or with --resume the newest whole one in the
    checkpoints folder; incomplete ones (a kill or a full disk during a save) are named and removed."""
    import shutil

    from ..adapters import check_adapter_dir

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


def model_card(meta: dict, adapter_dir: str) -> str:
    from ..modeling import TINY

    settings = ", ".join(f"{k}={v}" for k, v in meta["settings"].items() if v is not None) or "PEFT's defaults"
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in meta["metrics"].items()
                        if isinstance(v, (int, float)) and not any(w in k for w in ("runtime", "per_second", "epoch")))
    if get_method(meta["method"]).whole_model:
        return full_model_card(meta, adapter_dir, metrics)
    if meta["base_model"] == TINY:  # not on the Hub: the toolkit builds it
        load_base = "from peft_t5.modeling import tiny_model\nbase = tiny_model()  # peft-t5's tiny test T5"
    else:
        load_base = 'base = AutoModelForSeq2SeqLM.from_pretrained("%s")' % meta["base_model"]
    return f"""---
library_name: peft
base_model: {meta['base_model']}
tags: [peft, {meta['method']}, t5, peft-t5, {meta['task']}]
---
# {meta['task']} adapter for {meta['base_model']}

A {meta['method']} adapter{' on a 4-bit NF4 base (QLoRA)' if meta['qlora'] else ''} ({settings}) trained with
peft-t5 on the `{meta['task']}` task.

Prompt template: `{meta['template']}`

```python
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
{load_base}
model = PeftModel.from_pretrained(base, "{adapter_dir}")
tokenizer = AutoTokenizer.from_pretrained("{adapter_dir}")
```

## Final validation metrics
| metric | value |
|---|---|
{metrics}
"""


def full_model_card(meta: dict, model_dir: str, metrics: str) -> str:
    layers = meta["settings"].get("layers")
    blocks = f"the blocks of --layers {layers}" if layers else "every weight"
    return f"""---
library_name: transformers
base_model: {meta['base_model']}
tags: [t5, peft-t5, full-fine-tuning, {meta['task']}]
---
# {meta['task']} model fine-tuned from {meta['base_model']}

Full fine-tuning ({blocks} trained) with peft-t5 on the `{meta['task']}` task: a whole model, no adapter.

Prompt template: `{meta['template']}`

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained("{model_dir}")
tokenizer = AutoTokenizer.from_pretrained("{model_dir}")
```

## Final validation metrics
| metric | value |
|---|---|
{metrics}
"""


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
        from ..data import stream_splits

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
    from ..batching import auto_token_budget

    if training_args.max_tokens_per_batch == "auto":
        budget, how = auto_token_budget(model, training_args.bf16)
    else:
        budget, how = int(training_args.max_tokens_per_batch) or None, "--max_tokens_per_batch"
    if budget and streaming:
        budget, how = None, "--streaming has no lengths to group by"
    say(f"batches: up to {budget:,} padded tokens each ({how})" if budget else
        f"batches: {training_args.per_device_train_batch_size} examples each ({how})")
    return budget


def train(argv: list[str], callbacks: tuple = ()) -> dict:
    """Train an adapter (or with --method full, a whole model); returns the final metrics. The whole job, top to
    bottom (in run_training). callbacks: more Trainer callbacks (a sweep's pruning reporter).

    Under torchrun/accelerate every process runs this; only the main one prints, logs and writes the adapter.
    """
    with ExitStack() as held:  # the output folder's lock, released however the run ends
        return run_training(argv, held, callbacks)


def run_training(argv: list[str], held: ExitStack, callbacks: tuple = ()) -> dict:
    precheck_train(argv)
    import torch
    import transformers

    from ..adapters import quiet_adalora_warnings, save_adapter, save_initial_adapter, save_model_folder
    from ..data import tokenize, tokenize_stream
    from ..modeling import (TINY, count_parameters, load_base_model, load_tokenizer, prepare_for_training,
                            quantization_config)
    from ..tasks import get_task
    from ..training import StepBoundary, build_trainer, gathered_state_dict, plot_loss_curves

    warn_single_process_launch()
    model_args, data_args, lora_args, training_args = parse_train_args(argv)
    method = get_method(lora_args.method)
    held.enter_context(quiet_adalora_warnings(method.name == "adalora"))  # for checkpoints too
    settings = method.settings(lora_args.given())  # a flag of another method is refused before anything is written
    if not sys.stderr.isatty() and not any(a.startswith("--disable_tqdm") for a in argv):
        training_args.disable_tqdm = True  # a log file gets a plain line per logging step, not bar redraws
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
    base = load_base_model(model_args.model, qlora=model_args.qlora, dtype=dtype, trust_pickle=model_args.trust_pickle)
    budget = token_budget(training_args, base, data_args.streaming, say)
    model = prepare_for_training(base, method, settings, planned_steps(method, training_args, train_records, budget))
    initial = save_initial_adapter(model, held) if settings.get("init_lora_weights") in ("pissa", "olora") else None
    trainable, total = count_parameters(model)
    say(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    lengths = dict(max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length)
    if data_args.streaming:
        train_dataset, stats = tokenize_stream(task, train_records, tokenizer, **lengths), None
        say("training set: tokenized as it streams (truncation is not counted)")
    else:
        train_dataset, stats = tokenize(task, train_records, tokenizer, **lengths)
        say(f"training set: {stats}")
    eval_dataset, eval_stats = tokenize(task, eval_records, tokenizer, **lengths)
    say(f"validation set: {eval_stats}")
    generated = min(len(eval_records), data_args.generation_eval_samples)
    say(f"each evaluation: the loss on all {len(eval_records):,} validation records, {task.main_metric} on the "
        f"outputs generated for the first {generated:,} (--generation_eval_samples; --max_eval_samples caps both; "
        "evaluate.py scores a whole split)")

    trainer = build_trainer(model, tokenizer, task, train_dataset, eval_dataset, training_args,
                            eval_records[:data_args.generation_eval_samples], **lengths, max_tokens_per_batch=budget,
                            loraplus_lr_ratio=settings.get("loraplus_lr_ratio"))
    for callback in callbacks:
        trainer.add_callback(callback)
    resume = resume_checkpoint(training_args, say)
    started = time.time()
    boundary = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepBoundary))
    try:
        with saving_into(adapter_dir, model), boundary.noting_ctrl_c():
            trainer.train(resume_from_checkpoint=resume)
            metrics = trainer.evaluate()
    except KeyboardInterrupt:
        raise interrupted(trainer, argv) from None
    # under FSDP / ZeRO-3 each process holds a shard: gather the full tensors (every process takes part)
    state_dict = gathered_state_dict(trainer.model_wrapped, trainer.accelerator)
    if not trainer.is_world_process_zero():
        return metrics
    loss_before = next((e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), None)

    curve = Path(training_args.output_dir) / "loss_curve.png"
    plot_loss_curves(trainer.state.log_history, curve, f"{task.name} adapter on {model_args.model}")
    meta = {
        "task": task.name, "base_model": model_args.model, "template": task.template,
        "truncate_field": task.truncate_field, "qlora": model_args.qlora,
        "quantization": quantization_config().to_dict() if model_args.qlora else None,
        "max_source_length": data_args.max_source_length, "max_target_length": data_args.max_target_length,
        "method": method.name, "settings": settings, "trainable_parameters": trainable,
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
              f"model.\nFor the real thing: python scripts/train_lora.py --task {task.name} {real_data(task)}.")
    return metrics


def interrupted(trainer, argv: list[str]) -> Interrupted:
    """Ctrl-C: the step reached, the checkpoint kept and the command that continues from it. Between two steps
    (an evaluation, the final one too) the steps trained since the last checkpoint are saved as one first."""
    from ..training import StepBoundary

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
    command = [*(["python"] if sys.argv[0].endswith(".py") else []), sys.argv[0], *argv]
    again = shlex.join(command + ([] if "--resume" in argv else ["--resume"]))
    return Interrupted(f"interrupted at step {step}; {last} is kept{saved}; continue with: {again}")


def real_data(task) -> str:
    """The --data a real run of `task` takes: its Hub set, or the user's own file where the default is a demo."""
    if Path(task.default_data).exists():
        return f"--data YOUR_FILE (base {task.default_model}; the bundled sample is a demo)"
    return f"(base {task.default_model}, data {task.default_data} from the Hub)"


def show_reloaded_samples(task, model_args, adapter_dir: Path, records: list[dict], data_args,
                          whole_model: bool = False) -> None:
    """Reload the saved adapter with plain PEFT (a whole model with transformers) and print a few generations next
    to the references."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from ..generation import generate_texts
    from ..modeling import load_base_model

    records = printable_records(task, records)[:data_args.sample_generations]
    if not records:
        return
    model = (AutoModelForSeq2SeqLM.from_pretrained(adapter_dir) if whole_model else
             PeftModel.from_pretrained(load_base_model(model_args.model, qlora=model_args.qlora), adapter_dir))
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(adapter_dir)
    outputs = generate_texts(model, tokenizer, [task.source(r) for r in records],
                             max_source_length=data_args.max_source_length, max_new_tokens=data_args.max_target_length)
    print(f"\nsample generations from the reloaded {'model' if whole_model else 'adapter'} ({adapter_dir}):")
    for record, output in zip(records, outputs):
        print(f"  Q: {record['question']}\n     reference: {' | '.join(task.references(record)) or task.empty_output}"
              f"\n     generated: {shown(task, task.answer_from_output(output))}")


def printable_records(task, records: list[dict]) -> list[dict]:
    """The records a log may print: those the task's word filter passes (the real jokes data has offensive ones)."""
    return [r for r in records if task.printable(" ".join([task.source(r), *task.references(r)]))]


def shown(task, text: str) -> str:
    if not text:
        return task.empty_output
    return text if task.printable(text) else "(hidden: the word filter flags it)"
