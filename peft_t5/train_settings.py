"""Training's settings, from a command line (`peft-t5 train`), a YAML/JSON file or keywords (`peft_t5.train`): one
HfArgumentParser for all three, so that each setting has one name, one type and one check. Every check that needs
only the settings, the files' existence and layout, or a model's config.json runs first, before the heavy imports
(transformers' training arguments pull in PEFT and bitsandbytes: ~10 s), so that a mistake is reported at once."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .arguments import CONFIG_FILES, TRAINER_NUMBERS, check_trainer_numbers, closest, convert, normalized, read_config
from .errors import PeftT5Error
from .methods import get_method

logger = logging.getLogger(__name__)
PRECHECKED = ("task", "model", "data", "validation_data", "output_dir", "layers", "doc_stride", "max_source_length",
              *TRAINER_NUMBERS)
SWITCHES = ("overwrite_output_dir", "resume", "streaming", "qlora")  # flags that may stand alone (true)
USAGE = ("peft-t5 train [CONFIG.yaml|json] --task {jokes,squad,squad_extractive} [--model M] [--data FILE] [--lora_r R] "
         "[any Seq2SeqTrainingArguments flag]")


@dataclass
class TrainSettings:
    """What one training run was asked for: the four argument dataclasses, and how to say "continue" after Ctrl-C."""
    model: object  # arguments.ModelArguments
    data: object  # arguments.DataArguments
    method: object  # arguments.LoraArguments
    training: object  # training_arguments.TrainingArguments
    given: frozenset = frozenset()  # the names of the settings given, not defaulted
    command: list[str] | None = None  # the command line it came from, if any

    def __iter__(self):
        return iter((self.model, self.data, self.method, self.training))


def from_command_line(argv: list[str]) -> TrainSettings:
    """Flags, or a YAML/JSON config file first with flags after it that override it; checked before the heavy
    imports, then parsed."""
    path, config, flags = split_config(argv)
    precheck(config, flags, path=path)
    return parse_command_line(argv)


def parse_command_line(argv: list[str]) -> TrainSettings:
    """from_command_line's parse alone."""
    path, config, flags = split_config(argv)
    given = {*config, *(a[2:].split("=")[0] for a in flags if a.startswith("--"))}
    return TrainSettings(*parse(config, flags, path=path), given=frozenset(given), command=list(argv))


def split_config(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """(the config file, its settings, the flags after it): a first argument ending .yaml/.yml/.json is a config
    file; --flag-name is --flag_name."""
    if argv and argv[0].endswith(CONFIG_FILES):
        return argv[0], read_config(argv[0]), normalized(argv[1:], {})
    return None, {}, normalized(argv, {})


def from_keywords(config: str | Path | dict | None, keywords: dict) -> TrainSettings:
    """peft_t5.train's settings: a config file (or a dict of its settings) and keywords that override it."""
    path = str(config) if isinstance(config, (str, Path)) else None
    if path is not None and not path.endswith(CONFIG_FILES):
        raise PeftT5Error(f"{path}: a config file ends in {', '.join(CONFIG_FILES)}")
    base = read_config(path) if path else dict(config or {})
    precheck(base, [], path=path, keywords=keywords)
    return TrainSettings(*parse(base, [], path=path, keywords=keywords), given=frozenset({*base, *keywords}))


def parse(config: dict, flags: list[str], path: str | None = None, keywords: dict | None = None) -> list:
    """The four dataclasses, from a config file's settings, keywords over them and flags over both; a misspelled or
    prefixed flag or key is refused naming the closest real one."""
    from transformers import HfArgumentParser

    from .arguments import DataArguments, LoraArguments, ModelArguments, TrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message: str):  # one line, never argparse's usage block and SystemExit
            raise PeftT5Error(f"{message}; train_lora.py --help lists the flags")

    parser = Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments), prog="peft-t5 train",
                    description="Train a LoRA/QLoRA adapter on a T5 base (also: python scripts/train_lora.py).",
                    usage=USAGE, allow_abbrev=False)
    known = {a.dest: a for a in parser._actions}
    given = {key: (f"{path}: {key}", f"{path}: unknown key '{key}'", value) for key, value in config.items()}
    given.update((key, (key, f"{key}: unknown flag", value)) for key, value in (keywords or {}).items())
    defaults = {}
    for key, (where, unknown, value) in given.items():
        if key not in known:
            raise PeftT5Error(unknown + closest(key, known))
        known[key].required = False
        if isinstance(value, str) and known[key].nargs in ("+", "*"):
            value = [value]  # target_modules="all-linear" as --target_modules all-linear
        if callable(known[key].type):  # YAML reads 3e-4 as a string
            if isinstance(value, str):
                value = convert(where, value, known[key].type)
            elif isinstance(value, list):
                value = [convert(where, v, known[key].type) if isinstance(v, str) else v for v in value]
        defaults[key] = value
    parser.set_defaults(**defaults)
    try:
        *dataclasses, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    except ValueError as e:  # the Trainer's own checks of its arguments, e.g. strategies that do not match
        raise PeftT5Error(f"training arguments: {' '.join(str(e).split())}; see train_lora.py --help")
    if rest:
        flag = next((a for a in rest if a.startswith("-")), rest[0])
        name = flag.lstrip("-").split("=")[0]
        raise PeftT5Error(f"{flag}: unknown flag{closest(name, known, prefix='--')}; train_lora.py --help lists them")
    return dataclasses


def flag_values(config: dict, argv: list[str]) -> dict:
    """The values of the PRECHECKED flags and SWITCHES, from a config's settings and the flags after it."""
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


def precheck(config: dict, flags: list[str], path: str | None = None, keywords: dict | None = None,
             output: bool = True) -> None:
    """Every setting's name, the method's settings, the task, the data files' layout, the output folder (unless
    output is False: a sweep gives each trial its own) and the model, before the heavy imports; the full parse after
    them checks the rest."""
    from .adapters import check_writable_folder
    from .hub import model_config, model_problem
    from .tasks import get_task
    from .tasks.registry import looks_like_hub_id

    settings = {**config, **(keywords or {})}
    values = flag_values(settings, flags)
    check_names(config, flags, path, keywords or {})
    if "task" not in values:
        raise PeftT5Error("--task is required: jokes, squad or squad_extractive; train_lora.py --help lists the flags")
    check_trainer_numbers({name: number(name, values[name]) for name in TRAINER_NUMBERS if name in values})
    task = get_task(values["task"])
    for key in ("data", "validation_data"):
        data = values.get(key)
        if data and not looks_like_hub_id(data):
            if not Path(data).exists():
                raise PeftT5Error(f"{data}: no such file; pass --{key} with a local data file or a Hub dataset id")
            if values.get("streaming", "false").lower() not in ("true", "1"):
                task.check_layout(data)
    if "output_dir" in values:
        check_writable_folder(values["output_dir"], "--output_dir")
    method = check_method_settings(settings, flags)
    if method.whole_model and values.get("qlora", "false").lower() in ("true", "1"):
        raise PeftT5Error(f"--qlora with --method {method.name}: a 4-bit base cannot train its own weights (QLoRA "
                          "trains an adapter on a frozen 4-bit base); drop --qlora, or choose a PEFT --method")
    if task.kind == "extractive":
        check_extractive(method.name, values)
    on = {k: values.get(k, "false").lower() in ("true", "1") for k in SWITCHES}
    if output:
        check_output_dir(Path(values.get("output_dir") or f"adapters/{task.name}"), on["overwrite_output_dir"],
                         on["resume"] or "resume_from_checkpoint" in settings or
                         any(a.startswith("--resume_from_checkpoint") for a in flags))
    model = values.get("model") or task.default_model
    problem = model_problem(model)
    if problem:
        given = "--model" if "model" in values else f"the {task.name} task's base model (--model to choose another)"
        raise PeftT5Error(f"{given}: {problem}")
    config = model_config(model)
    if values.get("layers") and config is not None:  # blocks the model has, from its config.json alone
        from types import SimpleNamespace

        from .methods import layer_blocks

        layer_blocks(values["layers"], SimpleNamespace(**config))


def check_extractive(method: str, values: dict) -> None:
    """What a span head on T5 cannot train with, said before anything loads."""
    if method == "prompt_tuning":
        raise PeftT5Error("--method prompt_tuning with --task squad_extractive: its virtual tokens shift every "
                          "position the span head points at; choose lora, dora, ia3, adalora, vera or full")
    if values.get("streaming", "false").lower() in ("true", "1"):
        raise PeftT5Error("--streaming with --task squad_extractive: not supported (a question becomes a varying "
                          "number of windows); drop --streaming")
    stride, length = number("doc_stride", values.get("doc_stride", "")), \
        number("max_source_length", values.get("max_source_length", "512"))
    if stride is not None and length is not None and not 0 <= stride < length // 2:
        raise PeftT5Error(f"--doc_stride {stride:g}: the windows of a context overlap by it, so it must be from 0 to "
                          f"under half of --max_source_length ({length:g}); lower it")


def number(name: str, text: str) -> float | None:
    """A number a flag was given as text, checked here; one that is not a number is left to the full parse."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


def check_names(config: dict, flags: list[str], path: str | None, keywords: dict) -> None:
    """A misspelled flag, config key or keyword, refused before the Trainer's arguments are imported."""
    from .arguments import all_flags

    known = all_flags()
    if not known:  # transformers' source could not be read: the full parse refuses it, later
        return
    names = [(f"{path}: unknown key '{key}'", key, "") for key in config]
    names += [(f"{key}: unknown flag", key, "") for key in keywords]
    names += [(f"{arg.split('=')[0]}: unknown flag", arg[2:].split("=")[0], "--") for arg in flags
              if arg.startswith("--")]
    for said, name, prefix in names:
        if name not in known and name.removeprefix("no_") not in known:
            raise PeftT5Error(said + closest(name, known, prefix) +
                              ("; train_lora.py --help lists them" if prefix else ""))


def check_method_settings(settings: dict, flags: list[str]):
    """The PEFT method's settings in range (--lora_r 0, --lora_dropout 1.5), from a parse of those alone."""
    from .arguments import method_flag_values

    lora = method_flag_values(flags, settings)
    method = get_method(lora.method)
    method.settings(lora.given())
    return method


def check_output_dir(adapter_dir: Path, overwrite: bool, resume: bool) -> None:
    """An adapter is replaced only with --overwrite_output_dir, and files peft-t5 did not write are never replaced:
    a folder holding them is refused without the flag, and with it they stay beside the adapter."""
    from .adapters import ADAPTER_OWNS, MODEL_OWNS, check_writable_folder, foreign_files, is_adapter_dir, is_model_dir

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


def resolve_defaults(task, model_args, data_args, training_args) -> None:
    """The defaults that depend on the task, the data and the machine; settings no machine can run are refused."""
    import torch

    from .modeling import TINY
    from .trainer import launched_with

    model_args.model = model_args.model or task.default_model
    if data_args.data is None:
        data_args.data = task.default_data if model_args.model != TINY else task.sample
    if not training_args.output_dir_given:
        training_args.output_dir = f"adapters/{task.name}"
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
        from .modeling import bf16_supported

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
