"""`peft-t5 sweep CONFIG`: flags -> peft_t5.sweeping.sweep (which prints each trial, the table and the best)."""
from __future__ import annotations

from . import command_parser, parse_flags


def build_parser():
    parser = command_parser("peft-t5 sweep", "Search training flags (method, rank, learning rate, layers, ...) with "
                                             "Optuna: each trial trains in its own process; the study lives in SQLite "
                                             "in the sweep folder, so a stopped sweep continues where it was.")
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
    args = parse_flags(build_parser(), argv)

    from ..sweeping import sweep

    sweep(**vars(args))
