"""Merge an adapter into its base and check the merged model against the model as it was trained.

For a QLoRA adapter the model as trained is the NF4-quantized base + adapter. Merging into the original
full-precision weights changes that model (the adapter learned to correct the quantized base), and merging
into the 4-bit weights rounds the small update away. The default for QLoRA, `dequantized`, quantizes the
base to NF4 exactly as in training, dequantizes it to float32 and adds the LoRA update there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import (
    MODEL_OWNS,
    adapter_method,
    check_adapter_fits,
    check_writable_folder,
    peft_from_pretrained,
    read_metadata,
    write_atomically,
)
from .errors import PeftT5Error

LORA_TOLERANCE = 1e-4  # float32 merge vs unmerged: only summation order differs
# QLoRA, dequantized: the 4-bit layer dequantizes its weight to the compute dtype and multiplies, which is
# what the merged float32 layer does, so with float32 compute only summation order differs (same bound);
# with bf16 compute the trained model itself rounds every matmul input to 8 mantissa bits (relative 2^-8).
QLORA_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2 ** -8}
PROBES = [
    "question: Where is Normandy? context: Normandy is a region in the north of France.",
    "Why did the scarecrow win an award?",
    "question: Who wrote Hamlet? context: The play was written by William Shakespeare around 1600.",
    "What do you call a fish with no eyes?",
]


@dataclass
class MergeReport:
    merge_into: str
    max_logit_diff: float
    tolerance: float | None  # None: reported, not checked (merge into the original weights of a QLoRA base)
    output: str


def probe_logits(model, tokenizer) -> torch.Tensor:
    """The logits the merge is checked by: the language model's over a fixed answer, or a span head's start and
    end logits (extractive adapters)."""
    from .modeling import has_span_head

    batch = tokenizer(PROBES, return_tensors="pt", padding=True)
    if has_span_head(model):
        with torch.no_grad():
            out = model(**batch.to(next(model.parameters()).device))
        return torch.stack([out.start_logits, out.end_logits]).float().cpu()
    decoder_input_ids = tokenizer(["France is the answer here"] * len(PROBES), return_tensors="pt").input_ids
    decoder_input_ids = torch.cat([torch.zeros_like(decoder_input_ids[:, :1]), decoder_input_ids[:, :-1]], dim=1)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**batch.to(device), decoder_input_ids=decoder_input_ids.to(device)).logits.float().cpu()


def dequantize_into(full_model, quantized_model) -> int:
    """Copy each 4-bit layer's dequantized NF4 weight into the same layer of the full-precision model."""
    import bitsandbytes as bnb

    count = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            full_model.get_submodule(name).weight.data.copy_(weight.to(torch.float32))
            count += 1
    return count


def check_model_output(adapter_dir: str, output: str, overwrite: bool, what: str) -> None:
    """Refuse, before anything is loaded, an --output_dir that is a file, holds or lies in the adapter, or is in
    use."""
    check_writable_folder(output, "--output_dir")
    adapter, target = Path(adapter_dir).resolve(), Path(output).resolve()
    if target.is_relative_to(adapter) or adapter.is_relative_to(target):
        where = "is" if target == adapter else "lies inside" if target.is_relative_to(adapter) else "holds"
        raise PeftT5Error(f"--output_dir {output} {where} the adapter folder {adapter_dir}: the {what} would "
                          f"replace the adapter; pass a folder elsewhere, e.g. --output_dir merged/{adapter.name}")
    if Path(output).exists() and any(Path(output).iterdir()) and not overwrite:
        raise PeftT5Error(f"{output} already exists and is not empty; pass another --output_dir, or "
                          f"--overwrite_output_dir (the files of a {what} are replaced, other files kept)")


def merge(adapter: str, output_dir: str, model: str | None = None, dtype: str = "float32",
          merge_into: str | None = None, overwrite_output_dir: bool = False, trust_pickle: bool = False) -> MergeReport:
    """Merge `adapter` into its base (`model`, default: the base recorded with it) and write a plain transformers
    model to `output_dir`, once its logits are checked against the model as trained."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .modeling import load_base_model, quantization_config

    adapter_dir, output, overwrite = adapter, output_dir, overwrite_output_dir
    if dtype not in ("float32", "bfloat16"):
        raise PeftT5Error(f"--dtype {dtype}: choose float32 or bfloat16 (float16 overflows in T5)")
    if merge_into not in (None, "dequantized", "original"):
        raise PeftT5Error(f"--merge_into {merge_into}: choose dequantized or original")
    meta = read_metadata(adapter_dir, trust_pickle)
    method = adapter_method(adapter_dir)
    if not method.can_merge:
        raise PeftT5Error(f"{adapter_dir}: a {method.name} adapter cannot be merged: {method.why_no_merge}")
    base_name = model or meta.get("base_model")
    if not base_name:
        raise PeftT5Error(f"{adapter_dir}: no base model recorded in peft_t5.json; pass --model")
    qlora = bool(meta.get("qlora"))
    merge_into = merge_into or ("dequantized" if qlora else "original")
    if merge_into == "dequantized" and not qlora:
        raise PeftT5Error(f"{adapter_dir}: --merge_into dequantized is for QLoRA adapters; this one was trained "
                          "on a full-precision base, so it merges into the original weights")
    check_model_output(adapter_dir, output, overwrite, "merged model")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    span_head = meta.get("head") == "span"  # an extractive adapter: its base is T5ForQuestionAnswering
    model = load_base_model(base_name, trust_pickle=trust_pickle, span_head=span_head)
    check_adapter_fits(model, adapter_dir, base_name)
    if qlora:  # the model as trained: the NF4 base + adapter
        quantized = load_base_model(base_name, qlora=True, trust_pickle=trust_pickle, span_head=span_head)
        if merge_into == "dequantized":
            dequantize_into(model, quantized)
        reference = probe_logits(peft_from_pretrained(quantized, adapter_dir), tokenizer)
        del quantized
        tolerance = QLORA_TOLERANCE[quantization_config().bnb_4bit_compute_dtype] if merge_into == "dequantized" else None
    else:
        model = peft_from_pretrained(model, adapter_dir)  # merged in place below: one copy of the base
        reference = probe_logits(model, tokenizer)
        tolerance = LORA_TOLERANCE
    peft_model = model if isinstance(model, PeftModel) else peft_from_pretrained(model, adapter_dir)
    merged = peft_model.merge_and_unload()
    diff = (probe_logits(merged, tokenizer) - reference).abs().max().item()
    if tolerance is not None and diff > tolerance:
        raise PeftT5Error(f"{adapter_dir}: merged logits differ from the model as trained by {diff:.3g} "
                          f"(tolerance {tolerance:g}); nothing was written")

    merged = merged.to(getattr(torch, dtype))
    merged_meta = {key: meta.get(key) for key in ("task", "template", "truncate_field", "max_source_length",
                                                   "max_target_length")}
    merged_meta.update({key: meta[key] for key in ("head", "doc_stride", "max_answer_length") if key in meta})
    merged_meta.update(base_model=base_name, merged_from=str(adapter_dir), merge_into=merge_into, dtype=dtype,
                       max_logit_diff=diff)

    def write(tmp: Path) -> None:
        import json

        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "peft_t5.json").write_text(json.dumps(merged_meta, indent=2) + "\n", encoding="utf-8")

    write_atomically(Path(output), write, owns=MODEL_OWNS)
    return MergeReport(merge_into, diff, tolerance, str(output))
