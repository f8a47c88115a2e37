"""`peft-t5 estimate`: the memory a run would need, before loading anything."""
from __future__ import annotations

import json

from . import check_ranges, command_parser, parse_flags


def build_parser():
    parser = command_parser("peft-t5 estimate", "Parameters and training memory (weights, gradients, optimizer "
                                                "state) from config.json alone.")
    parser.add_argument("--model", required=True, help="Hub id, folder holding config.json, a config.json, or tiny")
    parser.add_argument("--qlora", action="store_true", help="Show only the QLoRA row (all rows are shown otherwise)")
    parser.add_argument("--optim", choices=["adafactor", "adamw"], default="adafactor",
                        help="Optimizer whose state is counted (default adafactor, T5's)")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--target_modules", nargs="+", default=None,
                        help="Layers LoRA adapts (default: q v; all-linear for every linear layer)")
    parser.add_argument("--layers", help="Train only these T5 blocks, e.g. encoder:0-5 or decoder:4-5 (full and the "
                                         "methods that take --layers)")
    parser.add_argument("--method", help="One method's row, its flags checked as train checks them (default: "
                                         "every method with its defaults)")
    parser.add_argument("--task", help="The task it trains for: squad_extractive counts a span head "
                                       "(T5ForQuestionAnswering) instead of the language-model head (default)")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table")
    return parser


def estimate_main(argv: list[str]) -> None:
    args = parse_flags(build_parser(), argv)
    check_ranges(args, lora_r=(1, 65536))

    from ..estimate import estimate, format_estimate

    result = estimate(args.model, optim=args.optim, r=args.lora_r, target_modules=args.target_modules,
                      layers=args.layers, method=args.method, task=args.task)
    if args.qlora:
        result = {k: v for k, v in result.items() if k not in ("full", "lora", "methods")}
        result["trainable_parameters"] = {"qlora": result["trainable_parameters"]["qlora"]}
    print(json.dumps(result, indent=2) if args.json else format_estimate(result))
