"""`peft-t5 merge` (scripts/merge_adapter.py): flags -> peft_t5.merging.merge -> what was checked and written."""
from __future__ import annotations

from . import command_parser, parse_flags


def build_parser():
    parser = command_parser("peft-t5 merge", "Merge an adapter into its base and write a standalone model folder "
                                             "(safetensors, config, tokenizer); also: python scripts/merge_adapter.py.")
    parser.add_argument("--adapter", required=True, help="The adapter folder train_lora.py wrote")
    parser.add_argument("--output_dir", required=True, help="The merged model's folder")
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny); default: the one recorded in the adapter")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Dtype of the saved weights")
    parser.add_argument("--merge_into", choices=["dequantized", "original"], help=(
        "QLoRA adapters: 'dequantized' (default) merges into the NF4-dequantized base the adapter was trained on; "
        "'original' into the original full-precision weights"))
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Write into a non-empty --output_dir "
                        "folder: a merged model's files are replaced, others kept")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    return parser


def merge_main(argv: list[str]) -> None:
    args = parse_flags(build_parser(), argv)

    from ..merging import merge

    report = merge(**vars(args))
    into = {"dequantized": "the NF4-dequantized base (as trained)", "original": "the original base weights"}
    print(f"merged {args.adapter} into {into[report.merge_into]}")
    check = f"tolerance {report.tolerance:g}: ok" if report.tolerance is not None else "reported, not checked"
    print(f"largest logit difference, merged vs the model as trained: {report.max_logit_diff:.3g} ({check})")
    print(f"wrote {report.output}/ ({args.dtype}); load it with T5ForConditionalGeneration.from_pretrained")
