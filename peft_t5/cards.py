"""The model card a training run writes beside its adapter (or whole model): how to load it, and its final
validation metrics."""
from __future__ import annotations

from .methods import get_method


def model_card(meta: dict, adapter_dir: str) -> str:
    from .modeling import TINY

    settings = ", ".join(f"{k}={v}" for k, v in meta["settings"].items() if v is not None) or "PEFT's defaults"
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in meta["metrics"].items()
                        if isinstance(v, (int, float)) and not any(w in k for w in ("runtime", "per_second", "epoch")))
    if get_method(meta["method"]).whole_model:
        return full_model_card(meta, adapter_dir, metrics)
    if meta["base_model"] == TINY:  # not on the Hub: the toolkit builds it
        load_base = "from peft_t5.modeling import tiny_model\nbase = tiny_model()  # peft-t5's tiny test T5"
    else:
        load_base = 'base = AutoModelForSeq2SeqLM.from_pretrained("%s")' % meta["base_model"]
    return f"""---
library_name: peft
base_model: {meta['base_model']}
tags: [peft, {meta['method']}, t5, peft-t5, {meta['task']}]
---
# {meta['task']} adapter for {meta['base_model']}

A {meta['method']} adapter{' on a 4-bit NF4 base (QLoRA)' if meta['qlora'] else ''} ({settings}) trained with
peft-t5 on the `{meta['task']}` task.

Prompt template: `{meta['template']}`

```python
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
{load_base}
model = PeftModel.from_pretrained(base, "{adapter_dir}")
tokenizer = AutoTokenizer.from_pretrained("{adapter_dir}")
```

## Final validation metrics
| metric | value |
|---|---|
{metrics}
"""


def full_model_card(meta: dict, model_dir: str, metrics: str) -> str:
    layers = meta["settings"].get("layers")
    blocks = f"the blocks of --layers {layers}" if layers else "every weight"
    return f"""---
library_name: transformers
base_model: {meta['base_model']}
tags: [t5, peft-t5, full-fine-tuning, {meta['task']}]
---
# {meta['task']} model fine-tuned from {meta['base_model']}

Full fine-tuning ({blocks} trained) with peft-t5 on the `{meta['task']}` task: a whole model, no adapter.

Prompt template: `{meta['template']}`

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained("{model_dir}")
tokenizer = AutoTokenizer.from_pretrained("{model_dir}")
```

## Final validation metrics
| metric | value |
|---|---|
{metrics}
"""
