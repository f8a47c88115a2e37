"""The OpenAI routes as other people's clients call them, with sampling settings: the `openai` package,
LangChain's `OpenAI` and `ChatOpenAI`, and `litellm.completion`, against a real loopback server. A seeded request
gives the same text through every client; choices come prompt-major; log-probabilities, stop strings and the
streamed usage chunk are where each client looks for them."""
import os

import openai
import pytest
from test_serve import JOKES, KEY, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bank = AdapterBank.load("tiny", {"jokes": make_adapter(root / "jokes", "jokes", 1)})
    with running(create_app(bank, ServeSettings(compile=False, api_key=KEY, request_timeout=60))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


SAMPLING = dict(temperature=0.9, top_p=0.95, seed=7)


def test_openai_completions_sample_n_per_prompt_in_order_with_logprobs(client):
    many = client.completions.create(model="jokes", prompt=JOKES[:2], max_tokens=12, n=3, logprobs=2, **SAMPLING)
    assert [c.index for c in many.choices] == list(range(6))
    second = client.completions.create(model="jokes", prompt=JOKES[1], max_tokens=12, n=3, logprobs=2,
                                       **{**SAMPLING, "seed": 7 + 3})  # prompt 1's samples draw from seed + 3..5
    assert [c.text for c in many.choices[3:]] == [c.text for c in second.choices]
    assert len({c.text for c in many.choices[:3]}) > 1  # sampled, not greedy three times
    for choice in many.choices:
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    decoded = sum(len(c.logprobs.tokens) + (c.finish_reason == "stop") for c in many.choices)
    assert many.usage.completion_tokens == decoded  # the engine's count: each text token, and </s> where it ended


def test_openai_chat_n_logprobs_and_stop(client):
    messages = [{"role": "user", "content": JOKES[0]}]
    chat = client.chat.completions.create(model="jokes", messages=messages, max_tokens=16, n=2, logprobs=True,
                                          top_logprobs=3, **SAMPLING)
    assert [c.index for c in chat.choices] == [0, 1]
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    text = chat.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.chat.completions.create(model="jokes", messages=messages, max_tokens=16, n=2, stop=[stop],
                                         **SAMPLING)
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_openai_streams_carry_choice_indices_and_usage_only_when_asked(client):
    expected = client.completions.create(model="jokes", prompt=JOKES[0], max_tokens=12, n=2, **SAMPLING)
    texts, usage = ["", ""], []
    for chunk in client.completions.create(model="jokes", prompt=JOKES[0], max_tokens=12, n=2, stream=True,
                                           stream_options={"include_usage": True}, **SAMPLING):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage.append(chunk.usage)
    assert texts == [c.text for c in expected.choices]
    assert usage[-1] is not None and usage[-1].completion_tokens == expected.usage.completion_tokens
    assert all(u is None for u in usage[:-1])
    plain = list(client.chat.completions.create(model="jokes", messages=[{"role": "user", "content": JOKES[0]}],
                                                max_tokens=12, stream=True, **SAMPLING))
    assert all(chunk.usage is None for chunk in plain)


def test_langchain_openai_llm_with_two_prompts_and_n_2(server, client):
    from langchain_openai import OpenAI

    llm = OpenAI(model="jokes", base_url=server + "/v1", api_key=KEY, max_tokens=12, n=2, max_retries=0,
                 **SAMPLING)
    result = llm.generate(JOKES[:2])
    direct = client.completions.create(model="jokes", prompt=JOKES[:2], max_tokens=12, n=2, **SAMPLING)
    assert [[g.text for g in prompt] for prompt in result.generations] == \
        [[c.text for c in direct.choices[:2]], [c.text for c in direct.choices[2:]]]


def test_langchain_chat_openai_invoke_and_stream(server, client):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="jokes", base_url=server + "/v1", api_key=KEY, max_tokens=12, max_retries=0,
                      temperature=0.9, seed=7)
    direct = client.chat.completions.create(model="jokes", messages=[{"role": "user", "content": JOKES[2]}],
                                            max_tokens=12, temperature=0.9, seed=7)
    expected = direct.choices[0].message.content
    assert chat.invoke(JOKES[2]).content == expected
    assert "".join(piece.content for piece in chat.stream(JOKES[2])) == expected


@pytest.mark.slow
def test_litellm_completion(server, client):
    import litellm

    reply = litellm.completion(model="openai/jokes", api_base=server + "/v1", api_key=KEY, max_tokens=12,
                               messages=[{"role": "user", "content": JOKES[1]}], n=2, **SAMPLING)
    direct = client.chat.completions.create(model="jokes", messages=[{"role": "user", "content": JOKES[1]}],
                                            max_tokens=12, n=2, **SAMPLING)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in direct.choices]
    assert reply.usage.completion_tokens == direct.usage.completion_tokens


def test_usage_counts_the_tokens_decoded_and_the_prompt_tokens_read(client):
    for max_tokens in (1, 2, 3, 5, 8):  # text that re-tokenizes into more tokens than were decoded
        done = client.completions.create(model="jokes", prompt="ü ñ 😀 مرحبا", max_tokens=max_tokens)
        assert done.usage.completion_tokens <= max_tokens
        assert done.choices[0].finish_reason == ("length" if done.usage.completion_tokens == max_tokens else "stop")
    long = " ".join(["word"] * 200)  # the adapter reads 48 source tokens
    raw = client.completions.with_raw_response.create(model="jokes", prompt=[JOKES[0], long], max_tokens=2)
    assert raw.headers["x-truncated-prompts"] == "1"
    short = client.completions.create(model="jokes", prompt=JOKES[0], max_tokens=2).usage.prompt_tokens
    assert raw.parse().usage.prompt_tokens == short + 48
