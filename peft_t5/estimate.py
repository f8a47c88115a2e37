"""Parameter counts and training memory of a T5, from its config.json alone (built on the meta device).

Memory is what weights, gradients and optimizer state take; activations depend on batch and length and
are not counted. Adafactor (the default) keeps a factored second moment: rows + columns for a matrix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import PeftT5Error
from .methods import FULL, METHODS
from .modeling import TINY, TINY_DIR, prepare_for_training

GIB = 1024**3
NF4_BYTES = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # 4 bits + double-quantized absmax (8 bits per 64, fp32 per 256 blocks)


def load_config(name: str):
    from transformers import AutoConfig

    path = TINY_DIR if name == TINY else Path(name)
    if path.is_file():  # a config file of any name
        import json

        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return AutoConfig.for_model(values.pop("model_type"), **values)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise PeftT5Error(f"{name}: not a model config.json ({type(e).__name__}: {e})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise PeftT5Error(f"{name}: no config.json there; pass a folder holding config.json, the file, or a Hub id")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as e:
        raise PeftT5Error(f"{name}: cannot read a model config ({str(e).splitlines()[0]}); "
                          "pass a folder holding config.json, the file, or a Hub id")
    return config


def meta_model(config, span_head: bool = False):
    """The model on the meta device: T5 with its language-model head, or (span_head) T5ForQuestionAnswering."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = (AutoModelForQuestionAnswering if span_head else AutoModelForSeq2SeqLM).from_config(config)
        # transformers 5 forces T5Config.tie_word_embeddings=True and keeps the file's flag only as
        # scale_decoder_outputs; a checkpoint saved untied (flan-t5) gets its own lm_head back on load.
        head = getattr(model, "lm_head", None)
        if getattr(config, "scale_decoder_outputs", True) is False and head is not None:
            head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    return model


def optimizer_state_numel(shapes: list[torch.Size], optim: str) -> int:
    if optim == "adamw":
        return sum(2 * s.numel() for s in shapes)
    return sum((s[-2] + s[-1]) * (s.numel() // (s[-2] * s[-1])) if len(s) >= 2 else s.numel() for s in shapes)


def estimate(name: str, optim: str = "adafactor", r: int = 16, target_modules=None, layers: str | None = None,
             method: str | None = None, task: str | None = None) -> dict:
    """Counts and GiB for full fine-tuning, LoRA (fp32 base) and QLoRA (NF4 base) of the model `name`; with layers
    (--layers), only the blocks it names train, in full fine-tuning and in each method that takes it. With `method`,
    the methods' rows hold that one, with its settings checked as train checks them (prompt_tuning takes no
    --layers). With an extractive task (squad_extractive), the model is T5ForQuestionAnswering: its span head
    trains with every method, and the methods a span head refuses have no row."""
    from .methods import get_method
    from .tasks import get_task
    from .train_settings import check_extractive

    spans = task is not None and get_task(task).kind == "extractive"
    chosen = get_method(method) if method else None
    if chosen is not None:
        chosen.settings({"layers": layers} if layers else {})  # train's own refusal of a flag it does not take
        if spans:
            check_extractive(chosen.name, {})
    config = load_config(name)
    model = meta_model(config, spans)
    total = sum(p.numel() for p in model.parameters())
    full = prepare_for_training(meta_model(config, spans), FULL, FULL.settings({"layers": layers}), 0)
    full_shapes = [p.shape for p in full.parameters() if p.requires_grad]
    full_trainable = sum(s.numel() for s in full_shapes)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ("lm_head",
                                                                                                 "qa_outputs")}
    quantizable = sum(m.weight.numel() for n, m in model.named_modules() if n in linear)

    lora = METHODS["lora"]
    peft_model = prepare_for_training(model, lora, lora.settings({"lora_r": r, "lora_alpha": 2 * r, "layers": layers,
                                                                  "target_modules": target_modules}), 0)
    trainable, with_adapter = peft_model.get_nb_trainable_parameters()
    lora_shapes = [p.shape for p in peft_model.parameters() if p.requires_grad]

    def setup(weights_bytes: float, grad_numel: int, shapes) -> dict:
        optim_bytes = 4 * optimizer_state_numel(shapes, optim)
        return {"weights_gib": weights_bytes / GIB, "gradients_gib": 4 * grad_numel / GIB,
                "optimizer_gib": optim_bytes / GIB, "total_gib": (weights_bytes + 4 * grad_numel + optim_bytes) / GIB}

    methods = {}
    rows = [chosen] if chosen is not None and not chosen.whole_model else [] if chosen else list(METHODS.values())
    rows = [row for row in rows if not (spans and row.name == "prompt_tuning")]  # train refuses it for a span head
    for row in rows:  # each on a fresh meta model: PEFT injects its layers in place
        given = {"layers": layers} if layers and "layers" in row.flags else {}
        adapted = prepare_for_training(meta_model(config, spans), row, row.settings(given), 1000)
        numel, _ = adapted.get_nb_trainable_parameters()
        methods[row.name] = {"trainable_parameters": numel, **setup(4 * total + 4 * numel, numel,
                                                                  [p.shape for p in adapted.parameters()
                                                                   if p.requires_grad])}
    return {
        "model": name,
        "task": task,
        "head": "span" if spans else "lm",
        "optimizer": optim,
        "total_parameters": total,
        "methods": methods,  # each method with its defaults, on an fp32 base
        "layers": layers,
        "trainable_parameters": {"full": full_trainable, "lora": trainable, "qlora": trainable},
        "full": setup(4 * total, full_trainable, full_shapes),
        "lora": setup(4 * with_adapter, trainable, lora_shapes),
        # prepare_model_for_kbit_training keeps the non-quantized weights (embeddings, norms, lm_head) in fp32
        "qlora": setup(NF4_BYTES * quantizable + 4 * (with_adapter - quantizable), trainable, lora_shapes),
    }


def format_estimate(e: dict) -> str:
    lines = [f"model: {e['model']}  (optimizer state for {e['optimizer']}; activations not counted)"
             + (f"\ntask {e['task']}: T5ForQuestionAnswering, a span head in place of the language-model head"
                if e.get("head") == "span" else "")
             + (f"\ntraining only the blocks of --layers {e['layers']}" if e.get("layers") else ""),
             f"total parameters: {e['total_parameters']:,}",
             f"{'setup':8} {'trainable':>14} {'weights':>9} {'grads':>9} {'optimizer':>9} {'total':>9}  (GiB)"]
    for setup in (s for s in ("full", "lora", "qlora") if s in e):  # --qlora keeps only its own row
        m = e[setup]
        lines.append(f"{setup:8} {e['trainable_parameters'][setup]:>14,} {m['weights_gib']:>9.3f} "
                     f"{m['gradients_gib']:>9.3f} {m['optimizer_gib']:>9.3f} {m['total_gib']:>9.3f}")
    if "methods" in e:
        lines.append("PEFT methods with their defaults" + (" and --layers" if e.get("layers") else "") +
                     " (fp32 base; --method and its flags in train_lora.py):")
        for name, m in e["methods"].items():
            lines.append(f"{name:14} {m['trainable_parameters']:>9,} {m['weights_gib']:>9.3f} "
                         f"{m['gradients_gib']:>9.3f} {m['optimizer_gib']:>9.3f} {m['total_gib']:>9.3f}")
    return "\n".join(lines)
