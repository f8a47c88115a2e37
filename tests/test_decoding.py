"""Decoding inside the continuous engine, against transformers as the reference: seeded sampling does not depend
on its neighbours; sample frequencies follow the model's softmax and what transformers' warpers leave (temperature,
top-k, top-p, min-p); stop strings end the text and the stream before them; log-probabilities equal a
teacher-forced pass; usage counts the decoded tokens; beam groups equal generate(num_beams=k) beside other rows."""

import pytest
import torch
from test_engine import SOURCES, StepGate, arriving, run, spread_weights
from test_serve import make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.modeling import tiny_model
from peft_t5.serve.decoding import Sampling, argmax


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A tiny T5 whose next-token distributions are peaked enough to count samples over (the output projection
    scaled up) and wander over the vocabulary; a LoRA adapter on it."""
    torch.manual_seed(0)
    base = spread_weights(tiny_model(), 0.2)
    with torch.no_grad():
        base.lm_head.weight.mul_(30)
    root = tmp_path_factory.mktemp("decoding")
    return AdapterBank.load(base, {"jokes": make_adapter(root / "jokes", "jokes", 1),
                                   "jokes2": make_adapter(root / "jokes2", "jokes", 3)})


def reference(bank, name: str, source: str, **options) -> list[int]:
    """generate()'s tokens for one templated source through one adapter (no start token)."""
    batch = bank.tokenizer([source], return_tensors="pt")
    model = bank.holders[name] if name != "base" else bank.holders["jokes"]
    with torch.inference_mode():
        out = model.generate(**batch, adapter_names=[bank.peft_name(name)], **options)
    return out[0, 1:].tolist()


def first_token_probs(bank, source: str, temperature: float = 1.0) -> torch.Tensor:
    batch = bank.tokenizer([source], return_tensors="pt")
    with torch.inference_mode():
        logits = bank.holders["jokes"](**batch, decoder_input_ids=torch.tensor([[0]])).logits[0, -1]
    return (logits / temperature).softmax(-1)


def complete(bank, requests: list[dict], **engine_options):
    """Run requests (engine.complete keyword arguments, plus names/sources/max_new_tokens, and after_steps: the
    engine step after which the request arrives, 0 by default): each joins the step after its own."""
    requests = [dict(r) for r in requests]
    gate = StepGate(*{r["after_steps"] for r in requests if r.get("after_steps")})

    async def clients(engine):
        def send(r):
            return lambda: engine.complete(r.pop("names"), r.pop("sources"), r.pop("max_new_tokens"), **r)
        plan = [(r.pop("after_steps", 0), send(r), len(r["sources"]) * max(r.get("n", 1), r.get("num_beams", 1)))
                for r in requests]
        return await arriving(engine, gate, plan)
    return run(clients, bank, on_step=gate, **engine_options)


def test_seeded_sampling_repeats_whatever_shares_its_steps(bank):
    source = bank.sources("jokes", SOURCES[:1])[0]
    for settings in [dict(temperature=0.9), dict(temperature=1.3, top_p=0.8), dict(temperature=0.7, top_k=5),
                     dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3, frequency_penalty=0.5)]:
        sampling = Sampling(seed=11, **settings)
        alone, other_seed = complete(bank, [
            dict(names=["jokes"], sources=[source], max_new_tokens=16, sampling=sampling),
            dict(names=["jokes"], sources=[source], max_new_tokens=16, sampling=Sampling(seed=12, **settings))])
        crowded = complete(bank, [
            dict(names=["jokes2", "base"], sources=SOURCES[1:3], max_new_tokens=20, min_new_tokens=20,
                 sampling=Sampling(temperature=1.0)),
            dict(names=["jokes"], sources=[source], max_new_tokens=16, sampling=sampling, after_steps=3)])[1]
        assert alone[0].ids == crowded[0].ids != other_seed[0].ids, settings


def test_every_sampled_token_has_probability_under_the_model(bank):
    """top_k 3: each sampled token is among the 3 most likely at its position, recomputed by a teacher-forced
    pass; and top_k 1 is greedy."""
    source = bank.sources("jokes", SOURCES[1:2])[0]
    done, greedy = complete(bank, [
        dict(names=["jokes"], sources=[source], max_new_tokens=12, n=6, sampling=Sampling(temperature=1.5, top_k=3,
                                                                                         seed=3)),
        dict(names=["jokes"], sources=[source], max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=1))])
    batch = bank.tokenizer([source] * 6, return_tensors="pt")
    assert len({tuple(c.ids) for c in done}) > 1  # the samples differ
    for sample in (c.ids for c in done):
        ids = torch.tensor([[0, *sample]])
        with torch.inference_mode():
            logits = bank.holders["jokes"](**{k: v[:1] for k, v in batch.items()}, decoder_input_ids=ids).logits[0]
        top3 = logits[:len(sample)].topk(3).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(sample))
    greedy_tokens = reference(bank, "jokes", source, do_sample=False, max_new_tokens=12)
    assert greedy[0].text == bank.tokenizer.decode(greedy_tokens, skip_special_tokens=True).strip()


def total_variation(counts: dict[int, int], probs: dict[int, float]) -> float:
    total = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / total - probs.get(k, 0.0)) for k in keys)


def first_tokens(bank, source: str, sampling: Sampling, samples: int = 400) -> dict[int, int]:
    requests = [dict(names=["jokes"], sources=[source], max_new_tokens=1, n=50,
                     sampling=Sampling(**{**sampling.__dict__, "seed": 1000 + 50 * i})) for i in range(samples // 50)]
    counts: dict[int, int] = {}
    for done in complete(bank, requests, max_rows=64, max_rows_per_request=50):
        for c in done:
            counts[c.ids[0]] = counts.get(c.ids[0], 0) + 1
    return counts


def bucketed(probs: torch.Tensor, top: int = 6) -> dict[int, float]:
    values, ids = probs.topk(top)
    return {**dict(zip(ids.tolist(), values.tolist())), -1: 1 - float(values.sum())}


def as_buckets(counts: dict[int, int], keys) -> dict[int, int]:
    out: dict[int, int] = {}
    for token, count in counts.items():
        key = token if token in keys else -1
        out[key] = out.get(key, 0) + count
    return out


def test_first_token_frequencies_follow_the_softmax_at_the_temperature_asked(bank):
    source = bank.sources("jokes", SOURCES[:1])[0]
    right, wrong = bucketed(first_token_probs(bank, source, 1.0)), bucketed(first_token_probs(bank, source, 1.4))
    wrong = {k: wrong.get(k, 0.0) for k in right} | {-1: 1 - sum(wrong.get(k, 0.0) for k in right if k != -1)}
    assert total_variation({k: round(v * 10000) for k, v in wrong.items()}, right) > 0.15  # the test can tell
    counts = as_buckets(first_tokens(bank, source, Sampling(temperature=1.0)), right)
    assert sum(counts.values()) == 400
    assert total_variation(counts, right) < 0.075


def transformers_distribution(bank, source: str, **settings) -> dict[int, float]:
    """The first token's distribution after transformers' own warpers (the reference), as generate() samples it."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    batch = bank.tokenizer([source], return_tensors="pt")
    with torch.inference_mode():
        logits = bank.holders["jokes"](**batch, decoder_input_ids=torch.tensor([[0]])).logits[:, -1]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])] + (
        [TopKLogitsWarper(settings["top_k"])] if "top_k" in settings else []) + (
        [TopPLogitsWarper(settings["top_p"])] if "top_p" in settings else []) + (
        [MinPLogitsWarper(settings["min_p"])] if "min_p" in settings else []))
    probs = warpers(torch.tensor([[0]]), logits).softmax(-1)[0]
    return {i: float(probs[i]) for i in probs.nonzero()[:, 0].tolist()}


def test_top_p_keeps_exactly_the_nucleus(bank):
    """At temperature 2 the first token's top four have about (0.46, 0.11, 0.10, 0.06): top_p just under the first
    three's sum keeps those three, and a top-p one token off would sample the fourth about 8% of the time."""
    source = bank.sources("jokes", SOURCES[:1])[0]
    values, ids = first_token_probs(bank, source, 2.0).topk(4)
    top_p = float(values[:3].sum()) - 0.002
    assert float(values[:2].sum()) < top_p and float(values[3] / values.sum()) > 0.05
    nucleus = transformers_distribution(bank, source, temperature=2.0, top_p=top_p)
    assert set(nucleus) == set(ids[:3].tolist())
    counts = first_tokens(bank, source, Sampling(temperature=2.0, top_p=top_p))
    assert set(counts) <= set(nucleus) and total_variation(counts, nucleus) < 0.075


@pytest.mark.parametrize("settings", [dict(temperature=2.0, top_k=4), dict(temperature=2.0, min_p=0.2),
                                      dict(temperature=3.0, top_k=6, top_p=0.9, min_p=0.2)])
def test_top_k_and_min_p_sample_what_transformers_warpers_leave(bank, settings):
    source = bank.sources("jokes", SOURCES[:1])[0]
    expected = transformers_distribution(bank, source, **settings)
    assert 2 <= len(expected) <= 5  # the warpers cut the vocabulary to a few tokens
    counts = first_tokens(bank, source, Sampling(**settings))
    assert set(counts) <= set(expected) and total_variation(counts, expected) < 0.075


def test_logprobs_equal_a_teacher_forced_pass_and_pieces_make_the_text(bank):
    source = bank.sources("jokes", SOURCES[3:4])[0]
    (done,), = complete(bank, [dict(names=["jokes"], sources=[source], max_new_tokens=20,
                                 sampling=Sampling(logprobs=5))])
    tokens = reference(bank, "jokes", source, do_sample=False, max_new_tokens=20)
    batch = bank.tokenizer([source], return_tensors="pt")
    with torch.inference_mode():
        logits = bank.holders["jokes"](**batch, decoder_input_ids=torch.tensor([[0, *tokens[:-1]]])).logits[0]
    teacher = logits.log_softmax(-1)
    text_tokens = [t for t in tokens if t != 1]
    assert len(done.logprobs) == len(text_tokens) and done.tokens == len(tokens)
    for i, (entry, token) in enumerate(zip(done.logprobs, text_tokens)):
        assert abs(entry.logprob - float(teacher[i, token])) < 1e-4
        assert len(entry.top) == 5 and abs(entry.top[0][1] - float(teacher[i].max())) < 1e-4
    assert "".join(e.text for e in done.logprobs) == done.text


def test_stop_strings_end_the_text_and_the_stream_before_them(bank):
    source = bank.sources("jokes", SOURCES[0:1])[0]
    (whole,), = complete(bank, [dict(names=["jokes"], sources=[source], max_new_tokens=24,
                                  sampling=Sampling(logprobs=0))])
    pieces = [e.text for e in whole.logprobs]
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    spanning = pieces[k].strip()[-2:] + pieces[k + 1].strip()[:2]  # the end of one token and the start of the next
    assert spanning in whole.text
    cut = whole.text.index(spanning)

    async def streamed(engine):
        got = []
        async for piece in engine.events(["jokes"], [source], 24, stop=("never there", spanning)):
            got.append(piece)
        return got
    events = run(streamed, bank)
    ended = events[-1].ended
    assert ended.text == whole.text[:cut] and ended.finish_reason == "stop" and ended.tokens < whole.tokens
    assert "".join(p.text for p in events) == whole.text[:cut]
    assert all(spanning not in "".join(p.text for p in events[:i + 1]) for i in range(len(events)))


def test_n_samples_come_input_major_and_best_of_ranks_by_mean_logprob(bank):
    sources = bank.sources("jokes", SOURCES[:2])
    sampling = Sampling(temperature=1.2, seed=5)
    done, = complete(bank, [dict(names=["jokes"] * 2, sources=sources, max_new_tokens=10, n=3, sampling=sampling,
                                 want_logprob=True)])
    alone = complete(bank, [dict(names=["jokes"], sources=[sources[1]], max_new_tokens=10, n=3,
                                 sampling=Sampling(temperature=1.2, seed=5 + 3))])[0]
    assert [c.text for c in done[3:]] == [c.text for c in alone]  # input 1's samples are outputs 3..5 (seed + index)
    assert all(c.mean_logprob is not None and c.mean_logprob < 0 for c in done)


def test_beam_groups_equal_generate_with_rows_of_other_adapters_joining_and_leaving(bank):
    names, sources = ["jokes", "base", "jokes2"], [bank.sources("jokes", [s])[0] for s in SOURCES[2:5]]
    done = complete(bank, [
        dict(names=["jokes2", "jokes"], sources=SOURCES[:2], max_new_tokens=6),  # greedy rows that leave early
        dict(names=names, sources=sources, max_new_tokens=15, num_beams=4, after_steps=1),
        dict(names=["base"], sources=SOURCES[5:6], max_new_tokens=30, after_steps=4)], max_rows_per_request=8)
    for name, source, got in zip(names, sources, done[1]):
        expected = reference(bank, name, source, num_beams=4, max_new_tokens=15, do_sample=False)
        assert got.text == bank.tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert got.finish_reason == ("stop" if 1 in expected else "length")


@pytest.mark.parametrize("vocab", [32128, 2048, 1000, 300])  # blocks of 128 whole, padded, and too few for blocks
def test_the_blocked_argmax_picks_what_torch_argmax_picks_ties_included(vocab):
    torch.manual_seed(vocab)
    scores = torch.randn(9, vocab)
    scores[1, [3, vocab - 1]] = 50.0  # a tie across blocks: the first index wins
    scores[2, [130, 131]] = 50.0  # a tie inside a block
    scores[3] = 7.0  # every token equal
    scores[4, -1] = 60.0  # the maximum in the padded last block
    assert torch.equal(argmax(scores), scores.argmax(-1))
    assert argmax(scores)[1] == 3 and argmax(scores)[3] == 0
