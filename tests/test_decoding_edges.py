"""Decoding at its edges, as the openai client and raw HTTP see it: every filter at its bounds keeps a token (top_p 0
is greedy), logprobs hold one entry per counted token spelled one way, streamed best_of counts every sample, a
stream its client leaves is a 499, and best_of and top_logprobs are refused by their own names."""
import re

import httpx
import openai
import pytest
import torch
from test_serve import JOKES, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running
from peft_t5.serve.decoding import Sampling, sample


@pytest.mark.parametrize("bounds", [dict(top_p=0.0), dict(top_p=1e-9), dict(top_k=1), dict(min_p=1.0),
                                    dict(top_p=0.0, top_k=1, min_p=1.0)])
def test_every_filter_at_its_bound_keeps_the_most_likely_token(bounds):
    torch.manual_seed(0)
    scores = torch.randn(6, 512) * 3
    scores[1] = 0.0  # a flat distribution: every token ties
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    tokens = sample(scores.clone(), [Sampling(temperature=1.0, **bounds)] * 6, generators)
    assert tokens.tolist()[2:] == scores.argmax(-1).tolist()[2:] and tokens[0] == scores[0].argmax()
    assert scores[1, tokens[1]] == scores[1].max()  # among ties, one of the most likely


def test_no_filter_at_its_open_bound_leaves_an_empty_or_improbable_choice():
    torch.manual_seed(1)
    scores = torch.randn(4, 256)
    for settings in (dict(top_p=1.0), dict(top_k=0), dict(min_p=0.0), dict(top_p=0.999, top_k=255, min_p=1e-6)):
        generators = [torch.Generator().manual_seed(i) for i in range(4)]
        tokens = sample(scores.clone(), [Sampling(temperature=1.0, **settings)] * 4, generators)
        assert (scores.softmax(-1).gather(1, tokens[:, None]) > 0).all()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter = make_adapter(tmp_path_factory.mktemp("edges") / "jokes", "jokes", 1)
    app = create_app(AdapterBank.load("tiny", {"jokes": adapter}), ServeSettings(compile=False, max_new_tokens=4000,
                                                                                 max_request_tokens=20_000))
    with running(app) as url:
        yield url


def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_top_p_zero_decodes_the_greedy_tokens(server):
    greedy = client(server).completions.create(model="jokes", prompt=JOKES[0], max_tokens=8, temperature=0,
                                               logprobs=1)
    nucleus = client(server).completions.create(model="jokes", prompt=JOKES[0], max_tokens=8, temperature=1.0,
                                                top_p=0, logprobs=1)
    assert nucleus.choices[0].text == greedy.choices[0].text != ""
    assert nucleus.choices[0].logprobs.tokens == greedy.choices[0].logprobs.tokens


def completion_entries(url, model: str, stream: bool, **request) -> tuple[list[str], list[dict], str, int]:
    """(tokens, top_logprobs, text, completion_tokens) of one completion, streamed or not."""
    made = client(url).completions.create(model=model, prompt=JOKES[1], logprobs=5, stream=stream,
                                          **({"stream_options": {"include_usage": True}} if stream else {}), **request)
    if not stream:
        lp = made.choices[0].logprobs
        return lp.tokens, lp.top_logprobs, made.choices[0].text, made.usage.completion_tokens
    tokens, top, text, usage = [], [], "", None
    for chunk in made:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                top += choice.logprobs.top_logprobs
    return tokens, top, text, usage


def chat_entries(url, model: str, stream: bool, **request) -> tuple[list[str], list[dict], str, int]:
    made = client(url).chat.completions.create(
        model=model, messages=[{"role": "user", "content": JOKES[1]}], logprobs=True, top_logprobs=5, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}), **request)
    def entries(content):
        return [e.token for e in content], [{t.token: t.logprob for t in e.top_logprobs} for e in content]
    if not stream:
        tokens, top = entries(made.choices[0].logprobs.content)
        return tokens, top, made.choices[0].message.content, made.usage.completion_tokens
    tokens, top, text, usage = [], [], "", None
    for chunk in made:
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                more_tokens, more_top = entries(choice.logprobs.content)
                tokens, top = tokens + more_tokens, top + more_top
    return tokens, top, text, usage


@pytest.mark.parametrize("entries", [completion_entries, chat_entries], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model, request_", [("base", dict(max_tokens=8)),  # the tiny base ends at once: </s>
                                             ("jokes", dict(max_tokens=12)),
                                             ("jokes", dict(max_tokens=12, stop=["e"]))],  # tokens after a stop
                         ids=["ends", "length", "stop"])
def test_logprobs_hold_one_entry_per_counted_token_spelled_as_its_top_key(server, entries, stream, model,
                                                                          request_):
    tokens, top, text, counted = entries(server, model, stream, temperature=0, **request_)
    assert len(tokens) == len(top) == counted > 0
    assert "".join(tokens) == text
    for token, alternatives in zip(tokens, top):
        assert token in alternatives  # greedy: the chosen token is the most likely, listed under its own spelling


def test_streamed_best_of_counts_every_sample_as_the_whole_reply_does(server):
    request = dict(model="jokes", prompt=JOKES[0], n=2, best_of=5, seed=1, max_tokens=24, temperature=1.0)
    whole = client(server).completions.create(**request)
    streamed = [c.usage for c in client(server).completions.create(**request, stream=True,
                                                                   stream_options={"include_usage": True}) if c.usage]
    assert streamed[-1].completion_tokens == whole.usage.completion_tokens > 24


def counted(url: str, status: int) -> float:
    found = re.search(rf'peft_t5_requests_total{{route="/v1/completions",status="{status}"}} (\S+)',
                      httpx.get(url + "/metrics").text)
    return float(found[1]) if found else 0.0


def test_a_stream_its_client_leaves_counts_as_499_and_a_whole_one_as_200(server):
    import time

    before = counted(server, 499), counted(server, 200)
    with httpx.stream("POST", server + "/v1/completions", timeout=300, json={
            "model": "jokes", "prompt": JOKES[0], "max_tokens": 3000, "stream": True}) as left:
        next(left.iter_lines())  # the first event came; the client goes
    deadline = time.monotonic() + 300  # a bound on a hang: the server sees the hang-up at its next event
    while counted(server, 499) == before[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert counted(server, 200) == before[1]
    list(client(server).completions.create(model="jokes", prompt=JOKES[0], max_tokens=3, stream=True))
    assert counted(server, 200) == before[1] + 1 and counted(server, 499) == before[0] + 1


def test_best_of_and_top_logprobs_are_refused_by_their_own_names(server):
    reply = httpx.post(server + "/v1/completions", json={"model": "jokes", "prompt": "Why?", "best_of": 100})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "best_of"
    assert reply.json()["error"]["message"].startswith("best_of: 100 samples a prompt is over this server's 8 rows")
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs: needs logprobs true") as raised:
        client(server).chat.completions.create(model="jokes", messages=[{"role": "user", "content": "Why?"}],
                                               logprobs=False, top_logprobs=2, max_tokens=3)
    assert raised.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs: needs logprobs true"):
        client(server).chat.completions.create(model="jokes", messages=[{"role": "user", "content": "Why?"}],
                                               top_logprobs=2, max_tokens=3)
