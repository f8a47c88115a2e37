"""The PEFT methods peft-t5 trains, one row each (as PEFT's tuners/): the flags that are the method's own, the PEFT
config built from them, and what the method supports (merging, mixing adapters in one batch, a 4-bit base).

    method = get_method("ia3")
    settings = method.settings(given)        # given: flag -> value the user set; defaults filled, others refused
    config = method.build(settings, total_steps)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import PeftT5Error

DEFAULTS = {  # every method flag's default; a method takes only those in its row
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q", "v"],
    "init_lora_weights": "default", "loraplus_lr_ratio": None,
    "num_virtual_tokens": 20,
    "init_r": 12, "target_r": 4, "tinit": 0.1, "tfinal": 0.3, "deltaT": 1, "orth_reg_weight": 0.5,
    "layers": None,
}
LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights", "loraplus_lr_ratio",
              "layers")
STACKS = ("encoder", "decoder")  # T5's two stacks of blocks: encoder.block.N, decoder.block.N
T5_LINEAR = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")  # every linear layer inside T5's blocks
IA3_T5 = {"target": ("k", "v", "wo"), "feedforward": ("wo",)}  # PEFT's own T5 rows for IA3
INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _lora(s: dict, total_steps: int, use_dora: bool = False):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules=targets(s), use_dora=use_dora,
                      init_lora_weights=INIT_LORA_WEIGHTS[s["init_lora_weights"]], task_type=TaskType.SEQ_2_SEQ_LM)


def _ia3(s: dict, total_steps: int):
    from peft import IA3Config, TaskType

    if not s["layers"]:
        return IA3Config(task_type=TaskType.SEQ_2_SEQ_LM)  # PEFT's T5 rows: scale k, v and wo (wo as feed-forward)
    blocks = parse_layers(s["layers"])
    return IA3Config(target_modules=layers_regex(blocks, IA3_T5["target"]),
                     feedforward_modules=layers_regex(blocks, IA3_T5["feedforward"]), task_type=TaskType.SEQ_2_SEQ_LM)


def _adalora(s: dict, total_steps: int):
    from peft import AdaLoraConfig, TaskType

    tinit, tfinal = round(s["tinit"] * total_steps), round(s["tfinal"] * total_steps)
    if tinit + tfinal >= total_steps:
        raise PeftT5Error(f"--tinit {s['tinit']} and --tfinal {s['tfinal']} (shares of the {total_steps} steps) leave "
                          "no steps to reallocate the rank in; lower them or train longer")
    return AdaLoraConfig(init_r=s["init_r"], target_r=s["target_r"], tinit=tinit, tfinal=tfinal, deltaT=s["deltaT"],
                         total_step=total_steps, orth_reg_weight=s["orth_reg_weight"], lora_alpha=s["lora_alpha"],
                         lora_dropout=s["lora_dropout"], target_modules=targets(s),
                         task_type=TaskType.SEQ_2_SEQ_LM)


def _prompt_tuning(s: dict, total_steps: int):
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(num_virtual_tokens=s["num_virtual_tokens"], task_type=TaskType.SEQ_2_SEQ_LM)


def _vera(s: dict, total_steps: int):
    from peft import TaskType, VeraConfig

    return VeraConfig(r=s["lora_r"], vera_dropout=s["lora_dropout"], target_modules=targets(s),
                      task_type=TaskType.SEQ_2_SEQ_LM)


def targets(s: dict):
    """PEFT's target_modules for the settings: the layers named, in every block or (--layers) in the blocks named."""
    every = s["target_modules"] in (["all-linear"], "all-linear")
    if s.get("layers"):
        return layers_regex(parse_layers(s["layers"]), T5_LINEAR if every else s["target_modules"])
    return "all-linear" if every else s["target_modules"]


def parse_layers(spec: str) -> dict[str, list[int] | None]:
    """--layers 'encoder:0-5,decoder:4' -> {'encoder': [0, ..., 5], 'decoder': [4]}; a stack alone (None) is all
    of its blocks. Syntax only: layer_blocks checks the numbers against a model."""
    blocks: dict[str, list[int] | None] = {}
    for part in spec.replace(" ", "").split(","):
        stack, _, numbers = part.partition(":")
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", numbers)
        if stack in STACKS and found and int(found[1]) > int(found[2] or found[1]):
            raise PeftT5Error(f"--layers {spec}: the range {numbers} in {part!r} is reversed; write "
                              f"{stack}:{found[2]}-{found[1]}")
        if stack not in STACKS or (numbers and not found):
            raise PeftT5Error(f"--layers {spec}: {part!r} is not a stack of blocks; write encoder, decoder, or a range "
                              "of block numbers in one, e.g. encoder:0-5,decoder:4-5")
        if not numbers or blocks.get(stack, []) is None:
            blocks[stack] = None
        else:
            first, last = int(found[1]), int(found[2] or found[1])
            blocks[stack] = sorted({*blocks.get(stack, []), *range(first, last + 1)})
    return blocks


def layer_blocks(spec: str | None, config) -> dict[str, list[int]] | None:
    """The blocks --layers names in a model of this config (its num_layers, num_decoder_layers); a block it does not
    have is refused. None: every block."""
    if not spec:
        return None
    counts = {"encoder": config.num_layers, "decoder": getattr(config, "num_decoder_layers", None) or config.num_layers}
    blocks = {stack: list(range(counts[stack])) if numbers is None else numbers
              for stack, numbers in parse_layers(spec).items()}
    missing = {stack: [n for n in numbers if n >= counts[stack]] for stack, numbers in blocks.items()}
    if any(missing.values()):
        stack = next(s for s in missing if missing[s])
        raise PeftT5Error(f"--layers {spec}: this model has no {stack} block {missing[stack][0]} (its encoder has "
                          f"blocks 0-{counts['encoder'] - 1}, its decoder 0-{counts['decoder'] - 1}); name blocks it has")
    return blocks


def layers_regex(blocks: dict[str, list[int] | None], names) -> str:
    """A target_modules pattern for the named layers in the named blocks only. Not PEFT's layers_to_transform: it
    takes one list of block numbers for every stack (encoder and decoder blocks are both `block.N`), and IA3 has none;
    a pattern, PEFT's other way to name modules, says each stack's blocks exactly."""
    stacks = "|".join(rf"{stack}\.block\." + (r"\d+" if numbers is None else f"({'|'.join(map(str, numbers))})")
                      for stack, numbers in blocks.items())
    return rf"({stacks})\.layer\.\d+\.\w+\.({'|'.join(names)})"


@dataclass(frozen=True)
class Method:
    name: str
    flags: tuple[str, ...]  # the method's own flags; any other method flag is refused
    build: Callable[[dict, int], object]  # (settings, total training steps) -> a PEFT config
    can_merge: bool  # PEFT's merge_and_unload gives a plain model
    mixed_batches: bool  # PEFT's adapter_names mixes adapters of this method in one batch
    kbit: bool  # trains on a 4-bit base (--qlora)
    why_no_merge: str = ""
    needs_steps: bool = False  # its schedule spans the run: the total number of steps must be known
    one_per_model: bool = False  # a PeftModel holds one adapter of it (AdaLoRA)
    soft_prompt: bool = False  # its adapter is embeddings put before the encoder's input; the layers stay the base's
    whole_model: bool = False  # no adapter: the model's own weights train, and the run saves a whole model

    def settings(self, given: dict) -> dict:
        """The user's flags for this method, with defaults for the rest; a flag of another method is refused."""
        foreign = [flag for flag, value in given.items() if value is not None and flag not in self.flags]
        if foreign:
            takes = ", ".join(f"--{f}" for f in self.flags) or "no flags of its own"
            raise PeftT5Error(f"--{foreign[0]} does not apply to --method {self.name} (it takes {takes}); leave it out")
        settings = {flag: given[flag] if given.get(flag) is not None else DEFAULTS[flag] for flag in self.flags}
        check_ranges(settings)
        return settings


def check_ranges(s: dict) -> None:
    """The settings' values in range, checked with the flags (before anything loads)."""
    for flag, what in (("lora_r", "the rank"), ("init_r", "the rank"), ("target_r", "the rank"),
                       ("num_virtual_tokens", "the soft prompt's length")):
        if flag in s and s[flag] < 1:
            raise PeftT5Error(f"--{flag} {s[flag]}: {what} must be at least 1")
    if "lora_dropout" in s and not 0 <= s["lora_dropout"] < 1:
        raise PeftT5Error(f"--lora_dropout {s['lora_dropout']}: must be in [0, 1)")
    if "init_r" in s and not s["target_r"] <= s["init_r"]:
        raise PeftT5Error(f"--target_r {s['target_r']} is over --init_r {s['init_r']}: AdaLoRA shrinks the rank budget")
    if s.get("orth_reg_weight", 0) < 0:
        raise PeftT5Error(f"--orth_reg_weight {s['orth_reg_weight']}: must be at least 0 (0: no penalty)")
    if s.get("layers"):
        parse_layers(s["layers"])


METHODS = {m.name: m for m in (
    Method("lora", LORA_FLAGS, _lora, can_merge=True, mixed_batches=True, kbit=True),
    Method("dora", LORA_FLAGS, lambda s, n: _lora(s, n, use_dora=True), can_merge=True, mixed_batches=False,
           kbit=True),
    Method("ia3", ("layers",), _ia3, can_merge=True, mixed_batches=False, kbit=True),
    Method("adalora", ("lora_alpha", "lora_dropout", "target_modules", "init_r", "target_r", "tinit", "tfinal",
                       "deltaT", "orth_reg_weight", "layers"), _adalora, can_merge=True, mixed_batches=False, kbit=True,
           needs_steps=True, one_per_model=True),
    Method("prompt_tuning", ("num_virtual_tokens",), _prompt_tuning, can_merge=False, mixed_batches=False, kbit=True,
           soft_prompt=True,
           why_no_merge="its virtual tokens are inputs prepended to every source, not weights, so there is nothing to "
                        "add to the base; serve or load it as an adapter"),
    Method("vera", ("lora_r", "lora_dropout", "target_modules", "layers"), _vera, can_merge=True, mixed_batches=False, kbit=True),
)}
# full fine-tuning, the baseline the PEFT methods are measured against: build gives no PEFT config
FULL = Method("full", ("layers",), lambda s, n: None, can_merge=False, mixed_batches=False, kbit=False,
              whole_model=True, why_no_merge="a full fine-tune is a whole model already; pass its folder as --model "
                                            "or --base")
TRAINABLE = {**METHODS, FULL.name: FULL}  # what --method takes: the PEFT methods (adapters) and full
# offered by PEFT for T5, refused here, with why
REFUSED = {"prefix_tuning": "prefix tuning on an encoder-decoder puts its prefix in the decoder's cache, which broke "
                            "with transformers' cache changes (PEFT #1188, #869); peft-t5 has not verified that it "
                            "trains and generates correctly with the installed versions, so it does not offer it; "
                            "use prompt_tuning"}
METHOD_FLAGS = tuple(DEFAULTS)
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "ADALORA": "adalora", "PROMPT_TUNING": "prompt_tuning", "VERA": "vera"}


def get_method(name: str) -> Method:
    if name in REFUSED:
        raise PeftT5Error(f"--method {name}: {REFUSED[name]}")
    if name not in TRAINABLE:
        import difflib

        near = difflib.get_close_matches(str(name), TRAINABLE, n=1, cutoff=0.6)
        raise PeftT5Error(f"--method {name}: unknown" + (f"; did you mean {near[0]}?" if near else "") +
                          f"; the methods that train: {', '.join(TRAINABLE)}")
    return TRAINABLE[name]


def method_of(adapter_config: dict) -> Method:
    """The method of a saved adapter, from its adapter_config.json (DoRA is LoRA with use_dora)."""
    name = PEFT_TYPES.get(adapter_config.get("peft_type", ""), "")
    if name == "lora" and adapter_config.get("use_dora"):
        name = "dora"
    if name not in METHODS:
        raise PeftT5Error(f"an adapter of PEFT type {adapter_config.get('peft_type')!r}, which peft-t5 does not "
                          f"handle; it handles {', '.join(METHODS)}")
    return METHODS[name]
