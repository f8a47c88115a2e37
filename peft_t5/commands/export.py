"""`peft-t5 export`: flags -> peft_t5.exporting.export -> what was checked and written."""
from __future__ import annotations

from . import command_parser, parse_flags


def build_parser():
    from ..exporting import QUANTIZATIONS

    parser = command_parser("peft-t5 export", "Merge an adapter into its base (checked as `peft-t5 merge` checks) "
                                              "and convert it with CTranslate2's converter; CTranslate2's greedy "
                                              "output is checked against the merged model's before anything is "
                                              "written.")
    parser.add_argument("--adapter", help="The adapter folder train_lora.py wrote (none: --model, a whole model's "
                                          "folder, is converted as it is)")
    parser.add_argument("--output_dir", required=True, help="The CTranslate2 model's folder")
    parser.add_argument("--format", choices=["ctranslate2"], default="ctranslate2", help="Export format")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="float32",
                        help="CTranslate2 weight type (default float32; int8 for the cheapest CPU serving)")
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny); default: the one recorded in the adapter")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Write into a non-empty --output_dir "
                        "folder: an export's files are replaced, others kept")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    return parser


def export_main(argv: list[str]) -> None:
    args = parse_flags(build_parser(), argv)

    from ..exporting import export

    report = export(**vars(args))
    if args.adapter:
        print(f"merged {args.adapter}: largest logit difference vs the adapter on its base {report.max_logit_diff:.3g}")
    print(f"CTranslate2 float32 greedy output equals the merged model's on {report.equal} of {report.probes} probes")
    if report.quantized_equal is not None:
        print(f"{report.quantization}: greedy output equals the merged float32 model's on {report.quantized_equal} "
              f"of {report.probes} probes (int8 can change tokens; check quality on your own data)")
    print(f"wrote {report.output}/ ({report.quantization}); load it with ctranslate2.Translator(\"{report.output}\")")
