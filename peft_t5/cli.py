"""`peft-t5 COMMAND`: dispatch only. Each command lives in peft_t5/commands/COMMAND.py (its arguments and its
function), imported only when run, so `peft-t5 --help` and a typo answer at once."""
from __future__ import annotations

import importlib
import logging
import sys
import warnings

from .errors import PeftT5Error

COMMANDS = {  # name -> (module in peft_t5/commands, its function, what it does)
    "train": ("train", "train", "train a LoRA/QLoRA adapter on a task (scripts/train_lora.py)"),
    "evaluate": ("evaluate", "evaluate_main", "generate answers for held-out data and score them (scripts/evaluate.py)"),
    "generate": ("generate", "generate_main", "answer questions with adapters on one loaded base (scripts/generate.py)"),
    "compare": ("compare", "compare_main",
                "base vs adapters side by side, a sheet to rate, or a ratings summary (scripts/compare.py)"),
    "merge": ("merge", "merge_main", "merge an adapter into its base as a plain transformers model (scripts/merge_adapter.py)"),
    "estimate": ("estimate", "estimate_main", "memory a run would need, before loading anything"),
    "serve": ("serve", "serve_main", "serve adapters over HTTP: batched across clients, a page to try and rate them"),
}


def command(name: str):
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(f".commands.{module}", __package__), function)


def run(command, argv: list[str]) -> int:
    """Run a command; a PeftT5Error becomes one line on stderr and exit status 2."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from PEFT/transformers internals
    try:
        command(argv)
    except PeftT5Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def usage() -> str:
    lines = [f"  {name:9s} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "usage: peft-t5 COMMAND [--help] ...\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        unknown = f"peft-t5: unknown command {argv[0]!r}\n" if argv else ""
        print(unknown + usage(), file=sys.stderr)
        return 2
    return run(command(argv[0]), argv[1:])
