"""`peft-t5 train` (scripts/train_lora.py): flags -> peft_t5.training.run -> the command that continues after Ctrl-C."""
from __future__ import annotations

import shlex
import sys

from ..errors import Interrupted


def train_main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        from ..arguments import train_help

        print(train_help())
        raise SystemExit(0)  # argparse's way, as every other command's --help
    from ..train_settings import from_command_line
    from ..training import run

    settings = from_command_line(argv)
    try:
        run(settings)
    except Interrupted as e:
        if not e.resumable:
            raise
        command = [*(["python"] if sys.argv[0].endswith(".py") else []), sys.argv[0], *argv]
        again = shlex.join(command + ([] if "--resume" in argv else ["--resume"]))
        raise Interrupted(f"{e.kept}; continue with: {again}") from None
