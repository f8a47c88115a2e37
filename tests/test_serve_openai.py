"""The OpenAI API and streaming over a real loopback server, spoken to by the real `openai` client: model listing,
completions and chat equal /v1/generate, streamed pieces concatenate to the whole output; a request past
--request_timeout gets a 504, one over the cost limit a 413, both in the server's one error shape."""
import json

import httpx
import openai
import pytest
from test_serve import AUTH, JOKES, KEY, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bank = AdapterBank.load("tiny", {"jokes": make_adapter(root / "jokes", "jokes", 1),
                                     "squad": make_adapter(root / "squad", "squad", 2)})
    settings = ServeSettings(compile=False, api_key=KEY, max_inputs=8, max_request_tokens=4000, request_timeout=20)
    with running(create_app(bank, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def native(url, adapter, inputs, max_new_tokens=24, **extra):
    reply = httpx.post(url + "/v1/generate", json={"adapter": adapter, "inputs": inputs,
                                                   "max_new_tokens": max_new_tokens, **extra}, headers=AUTH, timeout=60)
    return reply


def test_models_lists_base_and_every_adapter(client):
    assert [m.id for m in client.models.list()] == ["base", "jokes", "squad"]


def test_completions_and_chat_equal_the_native_api(server, client):
    expected = [o["raw"] for o in native(server, "jokes", JOKES[:3]).json()["outputs"]]
    completion = client.completions.create(model="jokes", prompt=JOKES[:3], max_tokens=24)
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == expected
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert {c.finish_reason for c in completion.choices} <= {"stop", "length"}
    chat = client.chat.completions.create(model="jokes", max_tokens=24, messages=[
        {"role": "system", "content": "be funny"}, {"role": "user", "content": JOKES[0]}])
    assert chat.choices[0].message.content == expected[0]


def test_streamed_completions_concatenate_to_the_whole_text(server, client):
    expected = [o["raw"] for o in native(server, "jokes", JOKES[:2], 40).json()["outputs"]]
    texts, chunks = ["", ""], 0
    for chunk in client.completions.create(model="jokes", prompt=JOKES[:2], max_tokens=40, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        chunks += 1
    assert texts == expected and chunks > 3
    chat = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="jokes", max_tokens=40, stream=True, messages=[{"role": "user", "content": JOKES[0]}]))
    assert chat == expected[0]


def test_native_streaming_ends_with_the_whole_reply(server):
    whole = native(server, "jokes", JOKES[:2], 40).json()
    with httpx.stream("POST", server + "/v1/generate", headers=AUTH, timeout=60,
                      json={"adapter": "jokes", "inputs": JOKES[:2], "max_new_tokens": 40, "stream": True}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2]) == whole
    pieces = [json.loads(e) for e in events[:-2]]
    assert ["".join(p["piece"] for p in pieces if p["index"] == i) for i in (0, 1)] == \
        [o["raw"] for o in whole["outputs"]]


def test_openai_errors_name_the_field(server, client):
    with pytest.raises(openai.NotFoundError, match="model: no adapter named 'nope'; GET /v1/models lists them"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.UnprocessableEntityError, match="a prompt fills one field: use POST /v1/generate"):
        client.completions.create(model="squad", prompt="Where is Normandy?")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature: Input should be less than or equal to 2"):
        client.completions.create(model="jokes", prompt="hi", temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="top_p: Input should be less than or equal to 1"):
        client.chat.completions.create(model="jokes", messages=[{"role": "user", "content": "hi"}], top_p=7)
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty: Input should be less than or equal"):
        client.completions.create(model="jokes", prompt="hi", presence_penalty=99)
    with pytest.raises(openai.UnprocessableEntityError, match="n: 9 samples an input is over this server's 8 rows"):
        client.completions.create(model="jokes", prompt="hi", n=9)
    with pytest.raises(openai.UnprocessableEntityError, match="echo: "):
        client.completions.create(model="jokes", prompt="hi", echo=True)


def test_a_request_over_the_cost_limit_is_refused_before_it_runs(server):
    reply = native(server, "jokes", JOKES[:5], 201, num_beams=4)
    assert reply.status_code == 413
    assert reply.json() == {"error": "max_new_tokens: 5 inputs x 4 beams x 201 tokens is 4,020, over this server's "
                                     "limit of 4,000 a request; send fewer inputs, beams or tokens",
                            "field": "max_new_tokens"}


def test_a_request_past_the_timeout_gets_a_504_and_the_server_goes_on(tmp_path):
    bank = AdapterBank.load("tiny", {"jokes": make_adapter(tmp_path / "jokes", "jokes", 1)})
    app = create_app(bank, ServeSettings(compile=False, request_timeout=0.2, max_new_tokens=4000, max_request_tokens=100_000))
    with running(app) as url:
        with app.state.engine.holding():  # it cannot end before its deadline, however fast the machine
            slow = httpx.post(url + "/v1/generate", json={"adapter": "jokes", "inputs": JOKES, "max_new_tokens": 4000},
                              timeout=60)
        assert slow.status_code == 504
        assert slow.json() == {"error": "the request took over 0.2 s, this server's --request_timeout; send fewer "
                                        "inputs or a lower max_new_tokens"}
        assert httpx.post(url + "/v1/generate", json={"adapter": "jokes", "inputs": JOKES[:1], "max_new_tokens": 2},
                          timeout=60).status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'peft_t5_requests_total{route="/v1/generate",status="504"} 1.0' in metrics
        assert "peft_t5_active_rows 0.0" in metrics


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int8", "--qlora"], "--quantize int8 and --qlora both quantize the base; pick one"),
    (["--request_timeout", "-1"], "--request_timeout -1.0: must be 0 (no limit) or more seconds"),
    (["--max_rows", "0"], "--max_rows 0: must be at least 1"),
    (["--max_request_tokens", "0"], "--max_request_tokens 0: must be at least 1"),
])
def test_engine_flags_are_checked_before_the_model_loads(tmp_path, flags, message):
    from peft_t5.commands.serve import parse_args
    from peft_t5.errors import PeftT5Error
    from peft_t5.serve.server import check_settings as check_args

    adapter = make_adapter(tmp_path / "jokes", "jokes", 1)
    with pytest.raises(PeftT5Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_args(parse_args(["--adapter", f"jokes={adapter}", *flags]))


def test_kv_cache_dtype_reaches_serve_from_the_flag_and_an_unknown_one_is_refused_before_the_model_loads(tmp_path):
    from peft_t5.commands.serve import parse_args
    from peft_t5.errors import PeftT5Error
    from peft_t5.serve.server import check_settings as check_args

    adapter = make_adapter(tmp_path / "jokes", "jokes", 1)
    assert parse_args(["--adapter", f"jokes={adapter}"])["kv_cache_dtype"] == "auto"
    settings = parse_args(["--adapter", f"jokes={adapter}", "--kv_cache_dtype", "bfloat16"])
    assert settings["kv_cache_dtype"] == "bfloat16"
    check_args(settings)
    settings["kv_cache_dtype"] = "float16"  # serve() called from Python: argparse's choices are not there
    with pytest.raises(PeftT5Error, match="^--kv_cache_dtype float16: auto, float32 or bfloat16$"):
        check_args(settings)
