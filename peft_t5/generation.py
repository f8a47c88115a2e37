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


@torch.inference_mode()
def sequence_log_probs(model, tokenizer: PreTrainedTokenizerBase, sources: list[str], targets: list[str],
                       batch_size: int = 16, max_source_length: int = 512) -> list[float]:
    """log p(target | source) per pair, summed over the target's tokens (teacher forcing)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sources), batch_size):
        batch = tokenizer(sources[start:start + batch_size], text_target=targets[start:start + batch_size],
                          return_tensors="pt", padding=True, truncation=True, max_length=max_source_length).to(device)
        labels = batch.pop("labels")
        labels[labels == tokenizer.pad_token_id] = -100
        logits = model(**batch, labels=labels).logits.float()
        picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (picked * (labels != -100)).sum(-1).tolist()
    return scores


def no_answer_probs(model, tokenizer: PreTrainedTokenizerBase, sources: list[str], outputs: list[str],
                    no_answer: str, batch_size: int = 16, max_source_length: int = 512,
                    max_new_tokens: int = 64, beams: int = 4) -> list[float]:
    """How sure the model is that a source has no answer: sigmoid(log p(no_answer) - log p(best answer)).

    The best answer is the generated output, or, where the model generated `no_answer`, the best of `beams`
    beams that is not it. Over 0.5: the model prefers no answer (as the official SQuAD v2 na_prob file
    expects: higher means more likely unanswerable).
    """
    answers = list(outputs)
    abstained = [i for i, o in enumerate(outputs) if o.strip().lower() == no_answer.strip().lower()]
    for i, text in zip(abstained, best_other_answers(model, tokenizer, [sources[i] for i in abstained], no_answer,
                                                     beams, max_source_length, max_new_tokens)):
        answers[i] = text
    null = sequence_log_probs(model, tokenizer, sources, [no_answer] * len(sources), batch_size, max_source_length)
    best = sequence_log_probs(model, tokenizer, sources, answers, batch_size, max_source_length)
    return [float(torch.sigmoid(torch.tensor(n - b))) for n, b in zip(null, best)]


@torch.inference_mode()
def best_other_answers(model, tokenizer: PreTrainedTokenizerBase, sources: list[str], no_answer: str, beams: int,
                       max_source_length: int, max_new_tokens: int) -> list[str]:
    """Per source, the most likely of `beams` beam-search outputs that is not `no_answer` ("" if all are)."""
    device = next(model.parameters()).device
    found = []
    for start in range(0, len(sources), 8):
        batch = tokenizer(sources[start:start + 8], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_source_length).to(device)
        generated = model.generate(**batch, num_beams=beams, num_return_sequences=beams, do_sample=False,
                                   max_new_tokens=max_new_tokens)
        texts = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        for k in range(len(texts) // beams):
            found.append(next((t for t in texts[k * beams:(k + 1) * beams]
                               if t.lower() != no_answer.strip().lower()), ""))
    return found
