"""`peft-t5 evaluate` (scripts/evaluate.py): flags -> peft_t5.evaluation.evaluate -> its metrics printed."""
from __future__ import annotations

import json
from pathlib import Path

from . import command_parser, parse_flags


def build_parser():
    from ..tasks import task_names

    parser = command_parser("peft-t5 evaluate", "Generate answers for held-out data and score them (also: python "
                                                "scripts/evaluate.py).")
    parser.add_argument("--task", required=True, choices=task_names(), help="The task the adapter was trained for")
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny), or a whole fine-tuned model; default: the "
                                        "adapter's recorded base")
    parser.add_argument("--adapter", help="An adapter folder to evaluate on the base")
    parser.add_argument("--data", help="squad: a SQuAD v2.0 JSON file (all of it is scored); jokes: a jokes file "
                                       "(its test split is scored); default: the bundled sample")
    parser.add_argument("--predictions", required=True, help="Where to write predictions; metrics go beside it")
    parser.add_argument("--limit", type=int, help="Score only the first N records")
    parser.add_argument("--num_beams", type=int, default=1, help="Beams for beam search (default 1: greedy)")
    parser.add_argument("--batch_size", type=int, default=16, help="Sources generated together (default 16)")
    parser.add_argument("--max_source_length", type=int, default=512,
                        help="Source tokens kept; longer sources are cut as in training (default 512)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer generated, in tokens (default 64)")
    parser.add_argument("--seed", type=int, default=42, help="jokes: the split seed used in training")
    parser.add_argument("--compare_base", action="store_true", help="With --adapter: score the base model too")
    parser.add_argument("--na_threshold", type=float, help="squad: answers whose no-answer probability is over this "
                        "count as no answer (default: the adapter's recorded threshold, else 1.0, i.e. none); "
                        "squad_extractive: the margin of the null score over the best span's (default: recorded, "
                        "else 0)")
    parser.add_argument("--doc_stride", type=int, help="squad_extractive: tokens shared by a context's windows "
                                                       "(default: the adapter's)")
    parser.add_argument("--max_answer_length", type=int, help="squad_extractive: longest span, in tokens (default: "
                                                              "the adapter's)")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    return parser


def evaluate_main(argv: list[str]) -> None:
    args = parse_flags(build_parser(), argv)

    from ..evaluation import evaluate

    result = evaluate(**vars(args))
    systems = {"adapter" if args.adapter else "model": result.metrics, "base": result.base_metrics}
    for system, metrics in systems.items():
        if metrics is not None:
            print(f"{system} ({result.model}{' + ' + args.adapter if system == 'adapter' else ''}):")
            print(json.dumps(metrics, indent=2))
    if result.na_threshold is not None:
        out = Path(result.predictions)
        print(f"no-answer threshold applied: {result.na_threshold:g}; the official script gives the same from the "
              f"files: python -m peft_t5.metrics.squad_v2 {result.data} {out} -n "
              f"{out.with_name(out.stem + '.na_prob.json')} -t {result.na_threshold!r}")
