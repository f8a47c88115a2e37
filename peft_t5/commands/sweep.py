"""`peft-t5 sweep CONFIG`: flags -> peft_t5.sweeping.sweep (which prints each trial, the table and the best)."""
from __future__ import annotations

from . import command_parser, parse_flags


def build_parser():
    parser = command_parser("peft-t5 sweep", "Search training flags (method, rank, learning rate, layers, ...) with "
                                             "Optuna: each trial trains in its own process; the study lives in SQLite "
                                             "in the sweep folder, so a stopped sweep continues where it was.")
    parser.add_argument("config", help="YAML or JSON: train (fixed flags), space (flags to search), trials, and "
                                       "optionally sampler (tpe, grid, random), objective, direction, pruner "
                                       "(or: peft-t5 sweep report --help)")
    parser.add_argument("--output_dir", default="runs/sweep", help="The sweep folder (default runs/sweep)")
    parser.add_argument("--workers", type=int, default=1, help="Trials run at once on this machine (default 1)")
    parser.add_argument("--storage", help="An Optuna storage shared by sweeps on several machines: a database URL, "
                                          "e.g. postgresql://user@host/db, or journal:PATH on a filesystem they share "
                                          "(default: SQLite in the sweep folder)")
    parser.add_argument("--study_name", default="sweep", help="The study's name in the storage (default sweep)")
    parser.add_argument("--objective", help="The metric to optimize, e.g. eval_rougeL (default: squad eval_f1, "
                                            "jokes eval_loss)")
    parser.add_argument("--keep_all", action="store_true", help="Keep every trial's adapter, not only the best's")
    return parser


def build_report_parser():
    parser = command_parser("peft-t5 sweep report", "The table and plots of a study, from its storage alone: any "
                                                    "machine, at any time (running trials are listed as RUNNING).")
    parser.add_argument("--storage", required=True, help="The study's storage URL, as its sweeps were given")
    parser.add_argument("--study_name", default="sweep", help="The study's name (default sweep)")
    parser.add_argument("--output_dir", required=True, help="Where trials.md, trials.csv and plots/ go")
    return parser


def sweep_main(argv: list[str]) -> None:
    if argv[:1] == ["report"]:
        args = parse_flags(build_report_parser(), argv[1:])

        from ..sweeping import report

        report(**vars(args))
        return
    args = parse_flags(build_parser(), argv)

    from ..sweeping import sweep

    sweep(**vars(args))
