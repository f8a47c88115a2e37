"""`peft-t5 COMMAND`: dispatch only. Each command lives in peft_t5/commands/COMMAND.py (its arguments and its
function), imported only when run, so `peft-t5 --help` and a typo answer at once."""
from __future__ import annotations

import importlib
import os
import sys

from .errors import Interrupted, PeftT5Error
from .logs import setup_logging

COMMANDS = {  # name -> (module in peft_t5/commands, its function, what it does)
    "train": ("train", "train_main", "train a LoRA/QLoRA adapter on a task (scripts/train_lora.py)"),
    "evaluate": ("evaluate", "evaluate_main", "generate answers for held-out data and score them (scripts/evaluate.py)"),
    "generate": ("generate", "generate_main", "answer questions with adapters on one loaded base (scripts/generate.py)"),
    "compare": ("compare", "compare_main",
                "base vs adapters side by side, a sheet to rate, or a ratings summary (scripts/compare.py)"),
    "merge": ("merge", "merge_main", "merge an adapter into its base as a plain transformers model (scripts/merge_adapter.py)"),
    "export": ("export", "export_main", "merge an adapter and convert it for CTranslate2, checked (one-adapter serving)"),
    "sweep": ("sweep", "sweep_main", "compare methods and settings on a task: an Optuna study, a table and plots"),
    "estimate": ("estimate", "estimate_main", "memory a run would need, before loading anything"),
    "serve": ("serve", "serve_main", "serve adapters over HTTP: batched across clients, a page to try and rate them"),
}


def command(name: str):
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(f".commands.{module}", __package__), function)


def run(command, argv: list[str]) -> int:
    """Run a command; a PeftT5Error becomes one line on stderr and exit status 2."""
    setup_logging()
    # every process of a launch fails alike: only the main one says so
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    try:
        command(argv)
    except Interrupted as e:
        say(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C); what was finished before it is kept", file=sys.stderr)
        return 130
    except PeftT5Error as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def usage() -> str:
    lines = [f"  {name:9s} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "usage: peft-t5 COMMAND [--help] ... | peft-t5 --version\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"peft-t5 {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            import difflib

            match = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.6)
            print(f"peft-t5: unknown command {argv[0]!r}" + (f"; did you mean {match[0]}?" if match else ""),
                  file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    return run(command(argv[0]), argv[1:])
