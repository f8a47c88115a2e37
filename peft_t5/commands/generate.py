"""`peft-t5 generate` (scripts/generate.py): answer questions with adapters on one loaded base."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PeftT5Error
from . import MAX_NEW_TOKENS, RENAMED, check_ranges, command_parser, parse_adapter_specs, parse_flags

# train's and evaluate's --task is a task; here the adapter that answers is named
OLD_FLAGS = {**RENAMED, "--task": "--adapter_name"}


def read_inputs(args) -> list:
    """Questions from the command line or --file (one per line, or JSON lines with question/context)."""
    items: list = list(args.questions)
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PeftT5Error(f"{args.file}: cannot read ({e}); pass a UTF-8 text file, one question per line")
        for i, line in enumerate(text for text in lines if text.strip()):
            if line.lstrip().startswith("{"):
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PeftT5Error(f"{args.file}: line {i + 1} is not valid JSON ({e})")
            else:
                items.append(line.strip())
    if args.context is not None:
        items = [(q, args.context) if isinstance(q, str) else q for q in items]
    if not items:
        raise PeftT5Error("no questions given; pass them as arguments or with --file")
    return items


def build_parser():
    parser = command_parser("peft-t5 generate", "Generate with adapters on one loaded base (also: python "
                                                "scripts/generate.py).")
    parser.add_argument("questions", nargs="*", help="Questions (jokes), or questions with --context (squad)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="An adapter to load, by name; repeat for several (none: --model answers alone)")
    parser.add_argument("--adapter_name", help="Which adapter answers (a NAME given with --adapter, or 'base' for "
                                               "no adapter); default: the one adapter given, or the model alone")
    parser.add_argument("--context", help="squad: the context for every question")
    parser.add_argument("--file", help="Questions, one per line, or JSON lines {\"question\": ..., \"context\": ...}")
    parser.add_argument("--model", help="Base model, or a whole fine-tuned model (--method full) to answer alone; "
                                        "default: the one recorded in the first adapter")
    parser.add_argument("--qlora", action="store_true", help="Load the base in 4-bit NF4")
    parser.add_argument("--compare_base", action="store_true", help="Also print the base model's output")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    parser.add_argument("--num_beams", type=int, default=1, help="Beams for beam search (default 1: greedy)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer generated, in tokens (default 64)")
    parser.add_argument("--na_threshold", type=float, help="squad: answer nothing where the no-answer probability is "
                        "over this (default: the adapter's recorded threshold)")
    return parser


def generate_main(argv: list[str]) -> None:
    args = parse_flags(build_parser(), argv, OLD_FLAGS)
    check_ranges(args, num_beams=(1, 16), max_new_tokens=(1, MAX_NEW_TOKENS), na_threshold=(0, 1))
    adapters = parse_adapter_specs(args.adapter)
    inputs = read_inputs(args)

    from ..bank import BASE, AdapterBank

    if not adapters and not args.model:
        raise PeftT5Error("pass --adapter NAME=FOLDER (repeat for several), or --model for a whole model alone")
    name = args.adapter_name or (next(iter(adapters)) if len(adapters) == 1 else BASE if not adapters else None)
    if name is None:
        raise PeftT5Error(f"--adapter_name: which adapter answers? one of {', '.join([BASE, *adapters])}")
    if name != BASE and name not in adapters:
        raise PeftT5Error(f"--adapter_name {name}: no such adapter; given: {', '.join([BASE, *adapters])}")
    bank = AdapterBank.load(args.model, adapters, qlora=args.qlora, trust_pickle=args.trust_pickle)
    options = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    prompt_of = name if name != BASE else next(iter(adapters), None)
    outputs = bank.generate(name, inputs, prompt_of=prompt_of if name == BASE else None,
                            na_threshold=args.na_threshold, **options)
    base_outputs = bank.generate(BASE, inputs, prompt_of=prompt_of, **options) if args.compare_base else None
    empty = bank.empty_output(prompt_of if name == BASE and prompt_of else name)
    for i, (item, output) in enumerate(zip(inputs, outputs)):
        question = item if isinstance(item, str) else (item.get("question") if isinstance(item, dict) else item[0])
        print(f"Q: {question}\n{name}: {output or empty}")
        if base_outputs is not None:
            print(f"base: {base_outputs[i] or empty}")
