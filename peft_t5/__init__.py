"""peft-t5: LoRA and QLoRA adapters for T5, trained with the HF Seq2SeqTrainer through PEFT.

    import peft_t5

    result = peft_t5.train(task="jokes", model="tiny", max_steps=30, output_dir="adapters/jokes-tiny")
    peft_t5.evaluate(task="jokes", adapter=result.output_dir, predictions="preds/jokes.json").metrics
    peft_t5.merge(result.output_dir, "merged/jokes-tiny")
    bank = peft_t5.AdapterBank.load("tiny", {"jokes": result.output_dir})
    bank.generate("jokes", "Why did the scarecrow win an award?")

Every function takes the command line's flags as keywords; a mistake raises PeftT5Error with the CLI's one-line
message. The names are imported on first use, so that `import peft_t5` (and a typo on the command line) is instant.
"""

__version__ = "0.1.0"

from .errors import Interrupted, PeftT5Error  # noqa: E402
from .logs import quiet_optional_kernel_notice  # noqa: E402

quiet_optional_kernel_notice()  # bitsandbytes' misleading warning on CPUs with AVX512-BF16, before it is imported

_PUBLIC = {  # name -> the module that holds it
    "train": "training", "TrainResult": "training",
    "evaluate": "evaluation", "EvaluationResult": "evaluation",
    "merge": "merging", "MergeReport": "merging",
    "export": "exporting", "ExportReport": "exporting",
    "sweep": "sweeping", "SweepResult": "sweeping",
    "AdapterBank": "bank",
}
__all__ = ["PeftT5Error", "Interrupted", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peft_t5' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
