"""How each row's next token is chosen, given the logits of one step: greedy, sampling (temperature, top-k, top-p,
min-p, penalties, a seed per row), log-probabilities, and beam groups. Pure tensor code, no I/O: the engine steps the
model, this module picks the tokens.

The operations and their order are transformers' logits processors (repetition penalty, min_new_tokens, then
temperature, top-k, top-p, min-p; their outputs are the reference the tests sample against), plus
OpenAI's presence and frequency penalties over the tokens a row decoded (as vLLM applies them, after the repetition
penalty). A row's log-probabilities are log-softmax of the logits that chose its token: after penalties and
temperature, before truncation (top-k/p, min-p), as vLLM and OpenAI define them.

Beam search (`BeamGroup`) is transformers' vectorised beam search for one input, step by step, so that its beams
can share the engine's steps with every other row; its outputs equal `generate(num_beams=k)`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NEG = -1.0e9  # transformers' beam search marks impossible candidates with this score


@dataclass(frozen=True)
class Sampling:
    """A request's decoding settings (OpenAI's names and meanings). temperature 0 is greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: not asked; k: the chosen token's log-probability and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


GREEDY = Sampling()


def generator_for(seed: int | None, index: int, device="cpu") -> torch.Generator:
    """A row's own random numbers: seeded rows repeat whatever else shares their steps (sample j of a request
    draws from seed + j); unseeded rows draw from a fresh random seed."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed + index) % 2**64)
    return g


@dataclass
class Choice:
    token: int
    logprob: float | None = None  # of the chosen token, when asked (or needed for best_of)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens and their log-probabilities


def choose(logits: torch.Tensor, settings: list[Sampling], histories: list[list[int]], generated: list[int],
           generators: list[torch.Generator | None], min_new: list[bool], eos: int,
           want_logprob: list[bool]) -> list[Choice]:
    """The next token of each row. logits [n, vocab] (float32); histories: each row's decoder input so far (the
    start token, then its tokens: what transformers' repetition penalty sees); generated: how many tokens each row
    has decoded; min_new: rows whose </s> is not allowed yet; want_logprob: rows that need their chosen token's
    log-probability."""
    if all(s.greedy and not s.penalized for s in settings) and not any(want_logprob):
        if any(min_new):
            logits[[i for i, m in enumerate(min_new) if m], eos] = -float("inf")
        return [Choice(t) for t in argmax(logits).tolist()]
    scores = penalize(logits, settings, histories, generated)
    if any(min_new):
        scores[[i for i, m in enumerate(min_new) if m], eos] = -float("inf")
    sampled = [i for i, s in enumerate(settings) if not s.greedy]
    every = len(sampled) == len(settings)  # then whole tensors, not copies of rows
    if sampled:
        temperature = torch.tensor([settings[i].temperature for i in sampled], dtype=scores.dtype)[:, None]
        if every:
            scores.div_(temperature)
        else:
            scores[sampled] = scores[sampled] / temperature
    logprobs = torch.log_softmax(scores, -1) if any(want_logprob) else None
    if every:
        tokens = sample(scores, settings, generators)
    else:
        tokens = argmax(scores)
        if sampled:
            tokens[sampled] = sample(scores[sampled], [settings[i] for i in sampled],
                                     [generators[i] for i in sampled])
    choices = [Choice(t) for t in tokens.tolist()]
    for i, choice in enumerate(choices):
        if want_logprob[i]:
            choice.logprob = float(logprobs[i, choice.token])
            k = settings[i].logprobs or 0
            if k:
                values, ids = logprobs[i].topk(k)
                choice.top = list(zip(ids.tolist(), values.tolist()))
    return choices


def argmax(scores: torch.Tensor, block: int = 128) -> torch.Tensor:
    """scores.argmax(-1) of [rows, vocab], the same index (the first of equal maxima), 4-8x faster on a CPU: there
    PyTorch's argmax costs ~50 us a row of 32k tokens, 25x its amax (1.7 ms a step at 32 rows), so the maxima of
    blocks are taken with amax, and argmax only runs over them and inside the one block that holds the maximum."""
    rows, vocab = scores.shape
    if scores.device.type != "cpu" or vocab < 4 * block:
        return scores.argmax(-1)
    pad = -vocab % block
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=-float("inf"))
    blocks = scores.view(rows, -1, block)
    first = blocks.amax(-1).argmax(-1)  # the first block holding each row's maximum
    return first * block + blocks[torch.arange(rows), first].argmax(-1)


def penalize(logits: torch.Tensor, settings: list[Sampling], histories: list[list[int]],
             generated: list[int]) -> torch.Tensor:
    """Repetition penalty over each row's decoder input (transformers' RepetitionPenaltyLogitsProcessor), then
    OpenAI's presence and frequency penalties over the tokens it decoded."""
    scores = logits
    for i, s in enumerate(settings):
        if not s.penalized:
            continue
        history = torch.tensor(histories[i], dtype=torch.long)
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(scores.shape[1], dtype=torch.bool)
            seen[history] = True
            row = scores[i]
            scores[i] = torch.where(seen, torch.where(row < 0, row * s.repetition_penalty, row / s.repetition_penalty),
                                    row)
        if (s.presence_penalty or s.frequency_penalty) and generated[i]:
            counts = torch.bincount(history[len(history) - generated[i]:], minlength=scores.shape[1]).to(scores.dtype)
            scores[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


def sample(scores: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from its distribution after top-k, top-p and min-p (transformers' warpers, in their
    order). Written by hand because the usual way, sorting the vocabulary for top-p and torch.multinomial per row,
    cost 3.6 ms a row on a CPU (118 ms a step at 32 rows, more than the model's step): here each row draws one
    uniform number from its own generator and inverts its cumulative distribution, and top-p is applied by
    rejection (FlashInfer's sorting-free sampling): a drawn token is kept if the tokens more likely than it hold
    less than top_p, else every token no more likely is dropped and the row draws again. Nucleus and draws are
    exactly transformers'; only the random stream differs from theirs."""
    vocab = scores.shape[1]
    top_k = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in settings])
    if bool((top_k < vocab).any()):
        kth = scores.topk(int(top_k.max()), -1).values.gather(1, (top_k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -float("inf"))
    probs = torch.softmax(scores, -1)  # the distribution top-p and min-p read
    weights = probs
    min_p = torch.tensor([s.min_p for s in settings], dtype=probs.dtype)
    if bool((min_p > 0).any()):
        weights = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    top_p = torch.tensor([s.top_p for s in settings], dtype=probs.dtype)
    tokens = torch.zeros(len(settings), dtype=torch.long)
    rows = torch.arange(len(settings))  # the rows still drawing, and their probs, weights and top_p
    for _ in range(64):
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows.tolist()])
        cdf = weights.cumsum(-1)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
        p = probs.gather(1, drawn[:, None])
        kept = top_p >= 1
        if not bool(kept.all()):
            above = F.relu(probs - p).sum(-1) + p[:, 0] * (probs > p).sum(-1)  # the mass of the more likely
            kept |= (above < top_p) | (above <= 0)  # the most likely token always stays (min_tokens_to_keep=1)
        tokens[rows[kept]] = drawn[kept]
        if bool(kept.all()):
            return tokens
        again = ~kept
        rows, probs, top_p, p = rows[again], probs[again], top_p[again], p[again]
        weights = weights[again].masked_fill(probs <= p, 0.0)
    for row, prob in zip(rows.tolist(), probs):  # 64 draws refused (a distribution tied over many tokens)
        tokens[row] = int(prob.argmax())
    return tokens


class BeamGroup:
    """The k beams of one input, as transformers' `_beam_search` runs them for a batch of one (its default
    length_penalty 1.0 and early_stopping False), one step at a time. `step` takes the k beams' logits and says, for
    each beam slot, which beam it continues and with which token; `done` once transformers would stop."""

    def __init__(self, k: int, max_new_tokens: int, min_new_tokens: int, eos: int, start: int,
                 length_penalty: float = 1.0):
        self.k, self.eos, self.min_new_tokens, self.length_penalty = k, eos, min_new_tokens, length_penalty
        self.max_length = 1 + max_new_tokens  # the decoder prompt is the start token
        self.cur_len = 1
        self.running = torch.full((k, self.max_length), start, dtype=torch.long)
        self.running_scores = torch.zeros(k)
        self.running_scores[1:] = NEG
        self.sequences = self.running.clone()
        self.scores = torch.full((k,), NEG)
        self.finished = torch.zeros(k, dtype=torch.bool)
        self.improvable = True
        self.done = False

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """logits [k, vocab] of the running beams -> (parent beam, next token) of each beam slot."""
        k, vocab = self.k, logits.shape[1]
        log_probs = torch.log_softmax(logits.float(), -1)
        if self.cur_len - 1 < self.min_new_tokens:
            log_probs[:, self.eos] = -float("inf")
        flat = (log_probs + self.running_scores[:, None]).reshape(-1)
        top_scores, top_indices = flat.topk(2 * k)
        parents, ids = top_indices // vocab, top_indices % vocab
        candidates = self.running[parents].clone()
        candidates[:, self.cur_len] = ids
        hits = (ids == self.eos) | (self.cur_len + 1 >= self.max_length)
        # the running beams: the best k candidates that did not stop
        keep = (top_scores + hits.float() * NEG).topk(k).indices
        self.running, self.running_scores = candidates[keep], (top_scores + hits.float() * NEG)[keep]
        # the finished: candidates among the top k that stopped, if they beat those kept so far
        ended = hits & (torch.arange(2 * k) < k)
        scored = top_scores / ((self.cur_len + 1 - 1) ** self.length_penalty)
        scored = scored + (not self.improvable) * NEG + (~ended).float() * NEG
        merged = torch.cat((self.scores, scored)).topk(k).indices
        self.sequences = torch.cat((self.sequences, candidates))[merged]
        self.scores = torch.cat((self.scores, scored))[merged]
        self.finished = torch.cat((self.finished, ended))[merged]
        self.cur_len += 1
        best_possible = self.running_scores[0] / ((self.cur_len - 1) ** self.length_penalty)
        worst = torch.where(self.finished, self.scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())
        self.done = not self.improvable or bool(hits.all())
        return parents[keep].tolist(), ids[keep].tolist()

    def best(self) -> list[int]:
        """The best finished sequence's tokens (without the start token, up to and including </s>)."""
        tokens = self.sequences[0, 1:self.cur_len].tolist()
        return tokens[:tokens.index(self.eos) + 1] if self.eos in tokens else tokens
