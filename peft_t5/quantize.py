"""int8 for serving on a CPU: the frozen base's linear layers become dynamic int8 (weights int8 per channel,
activations quantized per batch), LoRA's A and B stay in float32 beside them.

    quantize_int8(*bank.models())   # after the adapters are loaded or before: new adapters wrap the int8 layers too

PyTorch's dynamic quantization (torch.ao) is what runs int8 matmuls on a CPU without extra packages; it is marked
deprecated in favour of torchao, which is why its one warning is silenced here.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import PeftT5Error


def quantize_int8(*models: nn.Module) -> int:
    """Replace every float nn.Linear of the base (not LoRA's own) by a dynamic int8 one; returns how many. Models
    that share a layer (an AdapterBank's, see bank.models()) get one int8 layer for it."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if not torch.backends.quantized.supported_engines or torch.cuda.is_available() and next(
            models[0].parameters()).is_cuda:
        raise PeftT5Error("--quantize int8: dynamic int8 runs on a CPU; on a GPU serve the base in bf16 instead")
    targets = [(parent, name, child) for model in models for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is nn.Linear and not is_adapter_weight(parent)]
    replaced: dict[int, nn.Module] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        for parent, name, child in targets:
            if id(child) not in replaced:
                child.qconfig = per_channel_dynamic_qconfig
                replaced[id(child)] = Int8Linear.from_float(child.float())
            setattr(parent, name, replaced[id(child)])
    targets = parent = child = None  # no float layer may stay referenced (nor raise when there were none)
    with torch.inference_mode(False), torch.no_grad():  # (a clone made in inference mode could not be trained)
        for param in {id(p): p for model in models for p in model.parameters()}.values():
            param.data = param.data.clone()  # out of the checkpoint's memory map, so that the map, and in it the
    return len(replaced)  # float weights just quantized, leave memory (else they stay resident: 230 MB for t5-small)


def is_adapter_weight(parent: nn.Module) -> bool:
    """LoRA's A and B (and other adapters' own layers) live in ModuleDicts keyed by adapter name."""
    return isinstance(parent, nn.ModuleDict)
