"""`peft-t5 sweep CONFIG`: compare methods and settings on a task with an Optuna study (peft_t5/sweep.py)."""
from __future__ import annotations

import argparse

from . import check_ranges


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-t5 sweep", description=(
        "Search training flags (method, rank, learning rate, layers, ...) with Optuna: each trial trains in its own "
        "process; the study lives in SQLite in the sweep folder, so a stopped sweep continues where it was."))
    parser.add_argument("config", help="YAML or JSON: train (fixed flags), space (flags to search), trials, and "
                                       "optionally sampler (tpe, grid, random), objective, direction, pruner")
    parser.add_argument("--output_dir", default="runs/sweep", help="The sweep folder (default runs/sweep)")
    parser.add_argument("--workers", type=int, default=1, help="Trials run at once on this machine (default 1)")
    parser.add_argument("--storage", help="An Optuna storage URL shared by sweeps on several machines, e.g. "
                                          "postgresql://user@host/db (default: SQLite in the sweep folder)")
    parser.add_argument("--study_name", default="sweep", help="The study's name in the storage (default sweep)")
    parser.add_argument("--objective", help="The metric to optimize, e.g. eval_rougeL (default: squad eval_f1, "
                                            "jokes eval_loss)")
    parser.add_argument("--keep_all", action="store_true", help="Keep every trial's adapter, not only the best's")
    return parser


def sweep_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_ranges(args, workers=(1, 256))

    from ..sweep import Sweep, read_sweep_config

    config = read_sweep_config(args.config, args.objective)
    Sweep(config, args.output_dir, storage=args.storage, study_name=args.study_name, workers=args.workers,
          keep_all=args.keep_all).run()
