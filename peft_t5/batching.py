"""Batches by tokens, not by count: each batch holds as many examples as fit a budget of padded tokens.

A batch of short jokes then holds hundreds of them and a batch of long SQuAD contexts a few, so every step
gives the accelerator about the same, large amount of work. The loss is token-weighted (training.py), so
batches of different sizes still give the gradient of the tokens they hold.

The batches are cut once, like fairseq's `batch_by_size`: examples sorted by padded (source, target)
length, packed greedily under the budget. Each epoch the examples are reshuffled within each padded-length
class (which keeps every batch's padded shape, hence its cost and the batch count, fixed) and the batches
are visited in a new order; both depend only on (seed, epoch), so a resumed run replays the same batches.
The longest-source batch comes first so that an out-of-memory shows at the first step, not at the last.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Sampler

from .errors import PeftT5Error

logger = logging.getLogger(__name__)


def padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def batch_cost(source_lengths: list[int], target_lengths: list[int], multiple: int = 8) -> int:
    """Source + target tokens of a batch after padding each side to its longest, rounded up to `multiple`."""
    return len(source_lengths) * (padded(max(source_lengths), multiple) + padded(max(target_lengths), multiple))


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose padded source + target tokens stay within `max_tokens`.

    The batch count is a multiple of `count_multiple_of` (processes x gradient accumulation steps): accelerate
    hands batch i to process i % processes, so every process takes the same number of steps, every optimizer
    step accumulates whole, and no example is repeated to even them out. One process accumulating N batches
    then sees the same batches per step as N processes.
    """

    def __init__(self, source_lengths: list[int], target_lengths: list[int], max_tokens: int, seed: int = 42,
                 count_multiple_of: int = 1, pad_to_multiple_of: int = 8):
        if len(source_lengths) != len(target_lengths):
            raise ValueError("one source and one target length per example")
        self.max_tokens, self.seed, self.epoch, self.multiple = max_tokens, seed, 0, pad_to_multiple_of
        self.classes = [(padded(s, self.multiple), padded(t, self.multiple))
                        for s, t in zip(source_lengths, target_lengths)]
        longest = max(range(len(self.classes)), key=lambda i: sum(self.classes[i]), default=None)
        if longest is not None and sum(self.classes[longest]) > max_tokens:
            raise PeftT5Error(f"--max_tokens_per_batch {max_tokens}: example {longest} alone takes "
                              f"{sum(self.classes[longest])} tokens after padding; raise the budget or lower "
                              "--max_source_length/--max_target_length")
        if len(self.classes) < count_multiple_of:
            raise PeftT5Error(f"{len(self.classes)} training examples cannot fill {count_multiple_of} batches a step "
                              "(processes x --gradient_accumulation_steps); use more data or fewer of either")
        # sorted by padded class; ties in a fixed seeded order, reshuffled within the class each epoch
        generator = torch.Generator().manual_seed(seed)
        tiebreak = torch.randperm(len(self.classes), generator=generator).tolist()
        self.order = sorted(range(len(self.classes)), key=lambda i: (self.classes[i], tiebreak[i]))
        self.bounds = self._pack(count_multiple_of)

    def _pack(self, count_multiple_of: int) -> list[tuple[int, int]]:
        """(start, end) slices of the sorted order: greedy under the budget, then split to the multiple asked for."""
        bounds, start, longest_source, longest_target = [], 0, 0, 0
        for position, index in enumerate(self.order):
            source, target = self.classes[index]
            grown = (max(longest_source, source), max(longest_target, target))
            if position > start and (position - start + 1) * sum(grown) > self.max_tokens:
                bounds.append((start, position))
                start, grown = position, (source, target)
            longest_source, longest_target = grown
        if self.order:
            bounds.append((start, len(self.order)))
        while len(bounds) % count_multiple_of:  # halve the batch with the most examples: still within the budget
            i = max(range(len(bounds)), key=lambda b: bounds[b][1] - bounds[b][0])
            start, end = bounds[i]
            bounds[i:i + 1] = [(start, (start + end) // 2), ((start + end) // 2, end)]
        return bounds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = list(self.order)
        start = 0
        while start < len(order):  # shuffle within each run of one padded class: batch shapes stay the same
            end = start
            while end < len(order) and self.classes[order[end]] == self.classes[order[start]]:
                end += 1
            run = order[start:end]
            order[start:end] = [run[i] for i in torch.randperm(len(run), generator=generator).tolist()]
            start = end
        batches = [order[start:end] for start, end in self.bounds]
        first = max(range(len(batches)), key=lambda b: (self.classes[batches[b][-1]][0], -b))
        rest = [b for b in torch.randperm(len(batches), generator=generator).tolist() if b != first]
        for b in [first, *rest]:
            yield batches[b]

    def padded_tokens(self) -> list[int]:
        """Each batch's padded source + target tokens, in packing order (for reports and tests)."""
        return [(end - start) * (max(self.classes[i][0] for i in self.order[start:end])
                                 + max(self.classes[i][1] for i in self.order[start:end]))
                for start, end in self.bounds]


def auto_token_budget(model, bf16: bool) -> tuple[int | None, str]:
    """A token budget for this device and model, and a line saying how it was chosen.

    On a CPU: none (count batches of --per_device_train_batch_size; a CPU is compute-bound at any batch size).
    On a GPU: half of the memory left after the weights, over an estimate of the activation memory a padded
    token takes in training, between 1,024 and 65,536 tokens.
    """
    if not torch.cuda.is_available():
        return None, "on a CPU: batches of --per_device_train_batch_size examples"
    free, total = torch.cuda.mem_get_info()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = activation_bytes_per_token(model.config, 2 if bf16 else 4)
    budget = int(0.5 * max(free - weights, 0) / per_token) // 256 * 256
    budget = min(max(budget, 1024), 65536)
    return budget, (f"auto: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, {weights / 2**30:.1f} GiB of "
                    f"weights, ~{per_token / 2**20:.2f} MiB of activations a token")


def activation_bytes_per_token(config, dtype_bytes: int) -> float:
    """Activation memory one padded token keeps for the backward pass, from the model's shape (the larger of
    a source and a target token).

    Per encoder layer about 12 values of d_model and 6 of d_ff (norms, projections, the gated feed-forward,
    wo's float32 input, dropout masks), per decoder layer 18 of d_model (cross-attention) and 6 of d_ff,
    times 1.5 for attention and allocator slack; a target token adds float32 logits, log-softmax and their
    gradient. For flan-t5-large in bf16 this gives 2.9 MiB; an H100 run measured ~3.6 MiB a token at batch
    8 x 512 with eager attention, which the halving of free memory in auto_token_budget covers.
    """
    d, f = config.d_model, config.d_ff
    source = 1.5 * dtype_bytes * (12 * d + 6 * f) * config.num_layers
    target = 1.5 * dtype_bytes * (18 * d + 6 * f) * config.num_decoder_layers + 3 * 4 * config.vocab_size
    return max(source, target)
