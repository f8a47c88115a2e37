"""Export one adapter for the cheapest serving: the checked merge, then CTranslate2's own converter, then a check
that CTranslate2's greedy output equals the merged model's before anything is written.

    report = peft_t5.export("adapters/jokes", "exported/jokes", quantization="int8")

Many adapters on one base: `peft-t5 serve`. One adapter at the lowest cost per request: export it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import TOKENIZER_FILES, read_metadata, write_atomically
from .bank import model_metadata
from .errors import PeftT5Error
from .merging import PROBES, check_model_output, merge

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_bfloat16", "int16", "bfloat16")  # not float16: T5 overflows
CT2_OWNS = ("model.bin", "config.json", "shared_vocabulary.*", "source_vocabulary.*", "target_vocabulary.*",
            *TOKENIZER_FILES, "peft_t5.json")
CHECK_TOKENS = 32


@dataclass
class ExportReport:
    output: str
    quantization: str
    max_logit_diff: float  # of the merge, as merge reports it
    probes: int
    equal: int  # probes whose CTranslate2 greedy output equals the merged model's (float32: all, or it fails)
    quantized_equal: int | None  # with --quantization: probes whose quantized output equals float32's


def export(adapter: str | None, output_dir: str, quantization: str = "float32", model: str | None = None,
           overwrite_output_dir: bool = False, trust_pickle: bool = False, format: str = "ctranslate2") -> ExportReport:
    """Merge `adapter` into its base (checked as merge checks) and convert it to `format` (CTranslate2), checked
    against the merged model before anything is written. Without an adapter, `model` (a whole fine-tuned model's
    folder) is converted as it is."""
    if adapter is None:
        if not model or not (Path(model) / "config.json").is_file():
            raise PeftT5Error(f"--model {model}: without --adapter, pass a whole model's folder (what --method full "
                              "wrote) to convert as it is")
    adapter_dir, output = adapter or model, output_dir
    if format != "ctranslate2":
        raise PeftT5Error(f"--format {format}: the one export format is ctranslate2")
    if quantization not in QUANTIZATIONS:
        raise PeftT5Error(f"--quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)} (float16 "
                          "overflows in T5)")
    try:
        import ctranslate2
    except ImportError:
        raise PeftT5Error("exporting to CTranslate2 needs its package; pip install ctranslate2") from None
    check_model_output(adapter_dir, output, overwrite_output_dir, "CTranslate2 model")
    meta = read_metadata(adapter_dir, trust_pickle) if adapter else model_metadata(model)
    with tempfile.TemporaryDirectory(prefix="peft-t5-export-") as tmp:
        merged = Path(tmp) / "merged" if adapter else Path(model)
        difference = merge(adapter, str(merged), model, "float32", trust_pickle=trust_pickle).max_logit_diff \
            if adapter else 0.0
        converted = {}
        for q in dict.fromkeys(("float32", quantization)):
            converted[q] = Path(tmp) / f"ct2-{q}"
            ctranslate2.converters.TransformersConverter(str(merged)).convert(str(converted[q]), quantization=q)
        sources = probe_sources(meta.get("template") or "{question}")
        expected = merged_greedy(merged, sources)
        outputs = {q: ct2_greedy(ctranslate2, folder, merged, sources) for q, folder in converted.items()}
        equal = sum(a == b for a, b in zip(outputs["float32"], expected))
        if equal < len(sources):
            raise PeftT5Error(f"{adapter_dir}: CTranslate2's greedy output differs from the merged model's on "
                              f"{len(sources) - equal} of {len(sources)} probes; nothing was written")
        quantized_equal = None if quantization == "float32" else \
            sum(a == b for a, b in zip(outputs[quantization], expected))

        def write(folder: Path) -> None:
            for item in converted[quantization].iterdir():
                shutil.copy2(item, folder / item.name)
            for pattern in TOKENIZER_FILES:  # so that the folder alone can tokenize
                for item in merged.glob(pattern):
                    shutil.copy2(item, folder / item.name)
            record = {**model_metadata(str(merged)), "format": "ctranslate2", "quantization": quantization}
            (folder / "peft_t5.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        write_atomically(Path(output), write, owns=CT2_OWNS)
    return ExportReport(str(output), quantization, difference, len(sources), equal, quantized_equal)


def probe_sources(template: str) -> list[str]:
    """The merge probes, as the adapter's prompt shapes them (their question, and context where it takes one)."""
    from .tasks import template_fields

    fields = template_fields(template)
    sources = []
    for probe in PROBES:
        question, _, context = probe.removeprefix("question: ").partition(" context: ")
        values = [question, context or "It was written in France around 1600 by a scarecrow."]
        sources.append(template.format(**dict(zip(fields, values))))
    return sources


@torch.inference_mode()
def merged_greedy(folder: Path, sources: list[str]) -> list[list[int]]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    found = []
    for source in sources:  # one at a time: no padding, as CTranslate2 runs each
        ids = model.generate(**tokenizer([source], return_tensors="pt"), max_new_tokens=CHECK_TOKENS,
                             do_sample=False, num_beams=1)[0, 1:].tolist()
        found.append([t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)])
    return found


def ct2_greedy(ctranslate2, folder: Path, tokenizer_folder: Path, sources: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    translator = ctranslate2.Translator(str(folder), device="cpu")
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(s).input_ids) for s in sources]
    results = translator.translate_batch(pieces, beam_size=1, max_batch_size=1, max_decoding_length=CHECK_TOKENS)
    return [[t for t in tokenizer.convert_tokens_to_ids(r.hypotheses[0]) if t != tokenizer.pad_token_id]
            for r in results]
