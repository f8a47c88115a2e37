"""Batched greedy or beam generation, with batches grouped by source length to waste little on padding."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


@torch.inference_mode()
def generate_texts(model, tokenizer: PreTrainedTokenizerBase, sources: list[str], batch_size: int = 16,
                   max_source_length: int | list[int] = 512, max_new_tokens: int = 64, num_beams: int = 1,
                   adapter_names: list[str] | None = None, progress: bool = False, **generate_kwargs) -> list[str]:
    """Decoded outputs in the order of `sources`; batches hold sources of similar length.

    adapter_names: one PEFT adapter name per source, for a batch that mixes adapters.
    max_source_length: one limit for all, or one per source (a mixed batch truncates each as its adapter was trained).
    """
    if isinstance(max_source_length, int):
        encoded = tokenizer(sources, truncation=True, max_length=max_source_length).input_ids
    else:
        encoded = [tokenizer(s, truncation=True, max_length=limit).input_ids for s, limit in zip(sources, max_source_length)]
    order = sorted(range(len(sources)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(sources)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch")
    for start in starts:
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        if adapter_names is not None:
            generate_kwargs["adapter_names"] = [adapter_names[i] for i in idx]
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   do_sample=False, **generate_kwargs)
        for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            outputs[i] = text.strip()
    model.train(was_training)
    return outputs
