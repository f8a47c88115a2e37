"""How each row's next token is chosen, given the logits of one step: greedy, sampling (temperature, top-k, top-p,
min-p, penalties, a seed per row), log-probabilities, and beam groups. Pure tensor code, no I/O: the engine steps the
model, this module picks the tokens.

The operations and their order are transformers' logits processors (repetition penalty, min_new_tokens, then
temperature, top-k, top-p, min-p; `generate(do_sample=True, top_k=0, ...)` is the reference in the tests), plus
OpenAI's presence and frequency penalties over the tokens a row decoded (as vLLM applies them, after the repetition
penalty). A row's log-probabilities are log-softmax of the logits that chose its token: after penalties and
temperature, before truncation (top-k/p, min-p), as vLLM and OpenAI define them.

Beam search (`BeamGroup`) is transformers' vectorised beam search for one input, step by step, so that its beams
can share the engine's steps with every other row; its outputs equal `generate(num_beams=k)`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
        return [Choice(t) for t in logits.argmax(-1).tolist()]  # today's greedy path, unchanged
    scores = penalize(logits, settings, histories, generated)
    if any(min_new):
        scores[[i for i, m in enumerate(min_new) if m], eos] = -float("inf")
    sampled = [i for i, s in enumerate(settings) if not s.greedy]
    if sampled:
        temperature = torch.tensor([settings[i].temperature for i in sampled], dtype=scores.dtype)
        scores[sampled] = scores[sampled] / temperature[:, None]
    logprobs = torch.log_softmax(scores, -1) if any(want_logprob) else None
    tokens = scores.argmax(-1)
    if sampled:
        kept = truncate(scores[sampled], [settings[i] for i in sampled])
        probs = torch.softmax(kept, -1)
        for row, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[row:row + 1], 1, generator=generators[i])[0, 0]
    choices = [Choice(t) for t in tokens.tolist()]
    for i, choice in enumerate(choices):
        if want_logprob[i]:
            choice.logprob = float(logprobs[i, choice.token])
            k = settings[i].logprobs or 0
            if k:
                values, ids = logprobs[i].topk(k)
                choice.top = list(zip(ids.tolist(), values.tolist()))
    return choices


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


def truncate(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
    """top-k, then top-p, then min-p, each with its own value per row (transformers' warpers, in their order;
    removed tokens get -inf)."""
    vocab = scores.shape[1]
    top_k = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in settings])
    if bool((top_k < vocab).any()):
        kth = scores.topk(int(top_k.max()), -1).values.gather(1, (top_k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -float("inf"))
    top_p = torch.tensor([s.top_p for s in settings], dtype=scores.dtype)
    if bool((top_p < 1).any()):
        ordered, order = torch.sort(scores, descending=False)
        remove = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
        remove[:, -1] = False  # the most likely token stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    min_p = torch.tensor([s.min_p for s in settings], dtype=scores.dtype)
    if bool((min_p > 0).any()):
        probs = scores.softmax(-1)
        remove = probs < min_p[:, None] * probs.amax(-1, keepdim=True)
        remove.scatter_(1, probs.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


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
