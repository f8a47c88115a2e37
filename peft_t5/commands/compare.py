"""`peft-t5 compare` (scripts/compare.py): base vs adapters side by side, a sheet to rate, or a ratings summary."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PeftT5Error
from . import check_ranges, command_parser, parse_adapter_specs, parse_flags


def build_parser():
    parser = command_parser("peft-t5 compare", "Write question | reference | base | each adapter as Markdown and as a "
                                               "CSV to rate; or summarise ratings (also: python scripts/compare.py).")
    parser.add_argument("--questions", help="A jokes CSV/JSON (Question/Answer) or a text file, one question per line")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="An adapter to compare, by name; repeat for several")
    parser.add_argument("--model", help="Base model; default: the one recorded in the first adapter")
    parser.add_argument("--output", default="compare", help="Writes OUTPUT.md and OUTPUT.csv (default: compare)")
    parser.add_argument("--limit", type=int, default=20, help="At most N questions (default 20)")
    parser.add_argument("--ratings", help="A filled-in rating CSV, or the server's ratings.db, to summarise per system")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    return parser


def compare_main(argv: list[str]) -> None:
    from ..compare import comparison_rows, markdown_table, read_questions, summarise_ratings, write_rating_sheet

    args = parse_flags(build_parser(), argv, {"--base": "--model"})
    check_ranges(args, limit=(1, float("inf")))
    if args.ratings:
        from ..serve.ratings import RatingStore

        if Path(args.ratings).is_file() and RatingStore.is_database(args.ratings):
            summary = RatingStore(args.ratings).summary()
        else:
            summary = summarise_ratings(args.ratings)
        if not summary:
            raise PeftT5Error(f"{args.ratings}: nothing was rated yet; fill in the 1-5 rating columns (or rate on "
                              "the server's page) and run this again")
        print(json.dumps(summary, indent=2))
        return
    if not args.questions or not args.adapter:
        raise PeftT5Error("pass --questions FILE and at least one --adapter NAME=FOLDER (or --ratings FILE)")
    adapters = parse_adapter_specs(args.adapter)
    records = read_questions(args.questions)[:args.limit]
    if not records:
        raise PeftT5Error(f"{args.questions}: no questions in it")

    from ..bank import BASE, AdapterBank

    bank = AdapterBank.load(args.model, adapters, trust_pickle=args.trust_pickle)
    questions = [r["question"] for r in records]
    first = next(iter(adapters))
    outputs = {BASE: bank.generate(BASE, questions, prompt_of=first)}
    outputs.update({name: bank.generate(name, questions) for name in adapters})
    rows = comparison_rows(records, outputs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.md").write_text(markdown_table(rows), encoding="utf-8")
    write_rating_sheet(rows, list(outputs), Path(f"{args.output}.csv"))
    print(markdown_table(rows))
    print(f"wrote {args.output}.md and {args.output}.csv (fill in the rating columns, then: python scripts/compare.py --ratings {args.output}.csv)")
