"""peft-t5 serve over a real loopback socket: outputs equal AdapterBank.generate, requests batch across adapters,
adapters load and unload at run time, bad requests get a 4xx naming the field, the API key and adapter root hold."""
import json
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from peft_t5.adapters import save_adapter
from peft_t5.bank import AdapterBank
from peft_t5.errors import PeftT5Error
from peft_t5.kernels import kernels_used
from peft_t5.modeling import add_lora, tiny_model, tiny_tokenizer
from peft_t5.serve.app import ServeSettings, create_app, running
from peft_t5.tasks import get_task

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
JOKES = ["Why did the chicken cross the road?", "What do you call a fish with no eyes?", "How do cows stay up to date?",
         "Why?", "What is brown and sticky and lives in a forest far away from here?"]
SQUAD = [{"question": "Where is Normandy?", "context": "Normandy is a region in France."},
         {"question": "Who gave their name to it?", "context": "The Normans, in the 10th and 11th centuries."}]


def make_adapter(path, task_name: str, seed: int, base=None):
    """A LoRA adapter with random (non-zero) weights: as good as a trained one for checking what is served."""
    torch.manual_seed(seed)
    model = add_lora(base or tiny_model(), target_modules=["all-linear"], dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    task = get_task(task_name)
    meta = {"task": task.name, "base_model": "tiny", "template": task.template, "truncate_field": task.truncate_field,
            "max_source_length": 48, "qlora": False, "metrics": {"eval_loss": 1.5, "eval_runtime": 2.0}}
    save_adapter(model, tiny_tokenizer(), path, meta, "test adapter")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "jokes", "jokes", 1)
    make_adapter(root / "squad", "squad", 2)
    make_adapter(root / "jokes2", "jokes", 3)
    return root


@pytest.fixture(scope="module")
def reference(root):
    """What generate.py prints: AdapterBank.generate, one adapter at a time."""
    bank = AdapterBank.load("tiny", {"jokes": str(root / "jokes"), "squad": str(root / "squad")})
    return {"jokes": bank.generate("jokes", JOKES), "squad": bank.generate("squad", SQUAD, raw=True),
            "base": bank.generate("base", JOKES, prompt_of="jokes"),
            "jokes2": AdapterBank.load("tiny", {"jokes2": str(root / "jokes2")}).generate("jokes2", JOKES)}


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    bank = AdapterBank.load("tiny", {"jokes": str(root / "jokes"), "squad": str(root / "squad")})
    questions = [{"question": q, "answer": ""} for q in JOKES[:3]]
    ratings = tmp_path_factory.mktemp("ratings") / "ratings.db"
    settings = ServeSettings(compile=False, api_key=KEY, adapter_root=str(root), max_inputs=8,
                             rate_questions=questions, rate_systems=["base", "jokes"], ratings=str(ratings))
    app = create_app(bank, settings)
    with running(app) as url:
        yield url, app, ratings


def post(url, path, body, **kwargs):
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60, **kwargs)


@pytest.mark.slow
def test_outputs_equal_what_generate_prints_for_each_adapter_and_the_base(server, reference):
    url, _, _ = server
    jokes = post(url, "/v1/generate", {"adapter": "jokes", "inputs": JOKES}).json()["outputs"]
    assert [o["output"] for o in jokes] == reference["jokes"] and not any(o["truncated"] for o in jokes)
    squad = post(url, "/v1/generate", {"adapter": "squad", "inputs": SQUAD}).json()["outputs"]
    assert [o["raw"] for o in squad] == reference["squad"]
    base = post(url, "/v1/generate", {"adapter": "base", "inputs": JOKES, "prompt_of": "jokes"}).json()["outputs"]
    assert [o["output"] for o in base] == reference["base"]


def test_concurrent_mixed_requests_share_decoding_steps_and_each_gets_its_own_answers(server, reference):
    url, app, _ = server
    sample = app.state.metrics.registry.get_sample_value
    before = sample("peft_t5_step_rows_sum") or 0, sample("peft_t5_step_rows_count") or 0
    requests = [("jokes", [JOKES[i % 5]], reference["jokes"][i % 5]) if i % 2 == 0 else
                ("squad", [SQUAD[i % 2]], reference["squad"][i % 2]) for i in range(16)]
    engine = app.state.engine
    with ThreadPoolExecutor(16) as pool:
        with engine.holding():  # every request waits before the first step, whatever the machine's speed
            sent = [pool.submit(post, url, "/v1/generate", {"adapter": a, "inputs": i}) for a, i, _ in requests]
            engine.wait_until(lambda: engine.waiting_rows == len(requests))
        replies = [reply.result() for reply in sent]
    for (adapter, _, expected), reply in zip(requests, replies):
        assert reply.status_code == 200 and reply.json()["outputs"][0]["raw"] == expected, adapter
    row_steps = sample("peft_t5_step_rows_sum") - before[0]
    steps = sample("peft_t5_step_rows_count") - before[1]
    assert row_steps / steps > 2  # rows of several requests (and both adapters) share each decoding step


def test_a_burst_of_good_and_bad_requests_answers_every_good_one_right(server, reference):
    url, _, _ = server
    bad = [{"adapter": "nope", "inputs": ["x"]}, {"adapter": "jokes", "inputs": []}, {"adapter": "jokes"},
           {"adapter": "squad", "inputs": ["no context"]}, {"adapter": "jokes", "inputs": [3]}]
    bodies = [b for pair in zip([{"adapter": "jokes", "inputs": [q]} for q in JOKES], bad) for b in pair]
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda b: post(url, "/v1/generate", b), bodies))
    good = [r for b, r in zip(bodies, replies) if b.get("adapter") == "jokes" and b.get("inputs") and
            isinstance(b["inputs"][0], str)]
    assert [r.json()["outputs"][0]["output"] for r in good] == reference["jokes"]
    assert sorted(r.status_code for r in replies if r not in good) == [404, 422, 422, 422, 422]


@pytest.mark.parametrize("body, status, message", [
    ('{"adapter": "jokes", "inputs": ["x"', 400, "the body is not valid JSON"),
    ({"inputs": ["x"]}, 422, "adapter: Field required"),
    ({"adapter": "jokes", "inputs": "x"}, 422, "inputs: Input should be a valid list"),
    ({"adapter": "jokes", "inputs": [3]}, 422, "inputs[0]"),
    ({"adapter": "jokes", "inputs": ["x"], "max_new_tokens": "5"}, 422, "max_new_tokens: Input should be a valid integer"),
    ({"adapter": "jokes", "inputs": ["x"], "max_new_tokens": 100000}, 422, "max_new_tokens: 100000 is over"),
    ({"adapter": "jokes", "inputs": ["x"], "temperature": 5}, 422, "temperature: Input should be less than or equal to 2"),
    ({"adapter": "jokes", "inputs": ["x"], "temperature": "0.5"}, 422, "temperature: Input should be a valid number"),
    ({"adapter": "jokes", "inputs": ["x"], "num_beams": 2, "temperature": 0.5}, 422,
     "temperature: not with num_beams 2; beam search keeps the most likely sequences (send num_beams 1 to sample)"),
    ({"adapter": "jokes", "inputs": ["x"], "stop": ["a", "b", "c", "d", "e"]}, 422,
     "stop: List should have at most 4 items after validation, not 5"),
    ({"adapter": "nope", "inputs": ["x"]}, 404, "adapter: no adapter named 'nope'; loaded: base, jokes, squad"),
    ({"adapter": "base", "inputs": ["x"], "prompt_of": "nope"}, 404, "prompt_of: no adapter named 'nope'"),
    ({"adapter": "jokes", "inputs": []}, 422, "inputs: empty"),
    ({"adapter": "jokes", "inputs": ["x"] * 9}, 413, "inputs: 9 inputs, over this server's limit of 8"),
    ({"adapter": "jokes", "inputs": ["x" * 20001]}, 413, "inputs[0]: 20,001 characters, over this server's limit"),
    ({"adapter": "squad", "inputs": [{"question": "q"}]}, 422, "needs question, context; missing context"),
])
def test_bad_generate_requests_get_a_4xx_naming_the_field(server, body, status, message):
    url, _, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(url + "/v1/generate", content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert reply.status_code == status and message in reply.json()["error"], reply.text


def test_too_long_a_source_is_truncated_as_the_adapter_was_trained_and_said_so(server):
    url, app, _ = server
    long_question = " ".join(["why"] * 200)
    out = post(url, "/v1/generate", {"adapter": "jokes", "inputs": [long_question, "Why?"]}).json()["outputs"]
    assert [o["truncated"] for o in out] == [True, False]
    bank = app.state.bank
    cut = bank.tokenizer.decode(bank.tokenizer(long_question).input_ids[:47])  # 48 tokens with </s>
    assert out[0]["output"] == bank.generate("jokes", [cut])[0]


def test_adapters_load_and_unload_at_run_time_only_from_under_the_root(server, root, reference, tmp_path):
    url, _, _ = server
    assert post(url, "/v1/adapters", {"name": "jokes2", "path": "jokes2"}).status_code == 201
    listed = httpx.get(url + "/v1/adapters", headers=AUTH).json()["adapters"]
    assert [a["name"] for a in listed] == ["base", "jokes", "squad", "jokes2"]
    assert listed[1]["task"] == "jokes" and listed[1]["metrics"] == {"eval_loss": 1.5}
    out = post(url, "/v1/generate", {"adapter": "jokes2", "inputs": JOKES}).json()["outputs"]
    assert [o["output"] for o in out] == reference["jokes2"]
    assert post(url, "/v1/adapters", {"name": "jokes2", "path": "jokes2"}).status_code == 409
    assert httpx.delete(url + "/v1/adapters/jokes2", headers=AUTH).json() == {"unloaded": "jokes2"}
    assert "jokes2" not in [a["name"] for a in httpx.get(url + "/v1/adapters", headers=AUTH).json()["adapters"]]
    assert post(url, "/v1/generate", {"adapter": "nowhere", "inputs": ["x"]}).status_code == 404

    (root / "link-out").symlink_to(tmp_path)
    make_adapter(tmp_path / "outside", "jokes", 4)
    (root / "corrupt").mkdir()
    (root / "empty").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    cases = [({"name": "x", "path": "../outside"}, 403, "path: '../outside' is outside the adapter root"),
             ({"name": "x", "path": str(tmp_path / "outside")}, 403, "outside the adapter root"),
             ({"name": "x", "path": "link-out/outside"}, 403, "outside the adapter root"),
             ({"name": "x", "path": "missing"}, 404, "no such adapter folder"),
             ({"name": "x", "path": "empty"}, 404, "no adapter_config.json, so not an adapter folder"),
             ({"name": "x", "path": "corrupt"}, 422, "truncated or corrupt safetensors file"),
             ({"name": "base", "path": "jokes2"}, 422, "name: 'base' is not a valid adapter name"),
             ({"name": "x"}, 422, "path: Field required")]
    for body, status, message in cases:
        reply = post(url, "/v1/adapters", body)
        assert reply.status_code == status and message in reply.json()["error"], (body, reply.text)
    assert httpx.delete(url + "/v1/adapters/nope", headers=AUTH).status_code == 404


def test_an_adapter_of_another_base_is_refused_with_the_existing_message(server, root):
    from transformers import T5Config, T5ForConditionalGeneration

    config = tiny_model().config
    wider = T5ForConditionalGeneration(T5Config(**{**config.to_dict(), "d_ff": config.d_ff * 2}))
    make_adapter(root / "wider", "jokes", 5, base=wider)
    reply = post(server[0], "/v1/adapters", {"name": "wider", "path": "wider"})
    assert reply.status_code == 422 and "does not fit base 'tiny'" in reply.json()["error"]


def test_api_key_guards_every_route_but_health(server):
    url, _, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    for method, path in [("GET", "/v1/adapters"), ("POST", "/v1/generate"), ("GET", "/metrics"), ("GET", "/"),
                         ("DELETE", "/v1/adapters/jokes")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            reply = httpx.request(method, url + path, headers=headers)
            assert reply.status_code == 401 and "API key" in reply.json()["error"]
    assert httpx.get(url + "/?key=" + KEY).status_code == 200  # the page, as Jupyter's ?token=
    assert httpx.get(url + "/v1/adapters?key=" + KEY).status_code == 401  # only the page takes it there


def test_metrics_are_prometheus_text_with_requests_errors_latency_batches_and_tokens(server):
    url, _, _ = server
    assert post(url, "/v1/generate", {"adapter": "jokes", "inputs": JOKES[:1], "max_new_tokens": 2}).status_code == 200
    post(url, "/v1/generate", {"adapter": "nope", "inputs": ["x"]})
    text = httpx.get(url + "/metrics", headers=AUTH).text
    for line in ['peft_t5_requests_total{route="/v1/generate",status="200"}',
                 'peft_t5_errors_total{route="/v1/generate",status="404"}',
                 'peft_t5_request_seconds_bucket{le="0.005",route="/v1/generate"}', "peft_t5_step_rows_bucket",
                 "peft_t5_source_tokens_total", "peft_t5_generated_tokens_total"]:
        assert line in text, line
    engine = next(line for line in text.splitlines() if line.startswith("peft_t5_engine_info{"))
    assert 'weights="float32"' in engine and f'kernels="{kernels_used(torch.device("cpu"))}"' in engine
    assert 'kv_cache="float32"' in engine  # a float32 base's caches: float32 (auto)


def test_a_client_that_disconnects_mid_request_does_not_break_its_batch(server, reference):
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"adapter": "jokes", "inputs": JOKES}).encode()
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    with ThreadPoolExecutor(4) as pool:  # sent while the abandoned request is waiting or running
        replies = list(pool.map(lambda q: post(url, "/v1/generate", {"adapter": "jokes", "inputs": [q]}), JOKES[:4]))
    assert [r.json()["outputs"][0]["output"] for r in replies] == reference["jokes"][:4]


def test_blind_ratings_are_stored_summarised_and_read_by_compare(server, capsys):
    url, _, db = server
    seen = []
    for rater in ("ann", "bob"):
        for _ in range(3):
            item = httpx.get(url + "/v1/rate/next", params={"rater": rater}, headers=AUTH).json()
            assert not item["done"] and len(item["outputs"]) == 2
            seen.append(item["question"])
            scores = [{"funny": 5, "appropriate": 4}, {"funny": 1, "appropriate": 4}]
            assert post(url, "/v1/ratings", {"id": item["id"], "rater": rater, "scores": scores}).status_code == 201
        assert httpx.get(url + "/v1/rate/next", params={"rater": rater}, headers=AUTH).json() == {"done": True}
    assert sorted(seen) == sorted(JOKES[:3] * 2)  # each rater sees each question once
    bad = post(url, "/v1/ratings", {"id": "nope", "rater": "ann", "scores": []})
    assert bad.status_code == 404 and "never shown" in bad.json()["error"]
    bad = post(url, "/v1/ratings", {"id": "x", "rater": "ann", "scores": [{"funny": 6, "appropriate": 1}]})
    assert bad.status_code == 422 and bad.json()["error"].startswith("scores[0].funny: Input should be less than")

    summary = httpx.get(url + "/v1/ratings/summary", headers=AUTH).json()["systems"]
    rows = sqlite3.connect(db).execute("SELECT system, funny FROM ratings").fetchall()
    for system in ("base", "jokes"):
        funny = [f for s, f in rows if s == system]
        assert summary[system]["funny"]["count"] == 6 and summary[system]["appropriate"]["mean"] == 4.0
        assert summary[system]["funny"]["mean"] == pytest.approx(sum(funny) / 6)
    from peft_t5.cli import main

    assert main(["compare", "--ratings", str(db)]) == 0
    assert json.loads(capsys.readouterr().out) == summary


def test_concurrent_raters_lose_nothing_and_a_restart_keeps_every_rating(tmp_path):
    from peft_t5.serve.ratings import RatingStore

    store = RatingStore(tmp_path / "r.db")
    store.cache_outputs(0, {"a": "one", "b": "two"})
    shown = [(store.show(0, "Q?", {"a": "one", "b": "two"}, f"rater{i}")["id"], f"rater{i}") for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: RatingStore(tmp_path / "r.db").rate(s[0], [{"funny": 3, "appropriate": 5}] * 2, s[1]),
                      shown))
    summary = RatingStore(tmp_path / "r.db").summary()
    assert summary["a"]["funny"]["count"] == 40 and summary["b"]["appropriate"]["share_4_or_more"] == 1.0
    (tmp_path / "bad.db").write_text("not a database, just text that is long enough")
    with pytest.raises(PeftT5Error, match="bad.db: not a ratings database"):
        RatingStore(tmp_path / "bad.db")


def test_serve_refuses_a_public_address_without_a_key_before_loading_anything(root, monkeypatch):
    from peft_t5.commands.serve import parse_args
    from peft_t5.serve.server import check_settings as check_args

    monkeypatch.delenv("PEFT_T5_API_KEY", raising=False)
    args = parse_args(["--adapter", f"jokes={root / 'jokes'}", "--host", "0.0.0.0"])
    with pytest.raises(PeftT5Error, match="--host 0.0.0.0: refusing to serve beyond this machine without a key"):
        check_args(args)
    monkeypatch.setenv("PEFT_T5_API_KEY", "k")
    check_args(args)
    assert args["api_key"] == "k"
    with pytest.raises(PeftT5Error, match="--adapter jokes=nowhere: no such folder"):
        check_args(parse_args(["--adapter", "jokes=nowhere"]))
    with pytest.raises(PeftT5Error, match="--rate_systems: funny not loaded"):
        check_args(parse_args(["--adapter", f"jokes={root / 'jokes'}", "--rate_systems", "base,funny"]))


def test_metrics_say_which_compiled_graphs_are_ready_and_which_failed_and_stay_eager():
    from prometheus_client import generate_latest

    from peft_t5.serve.app import Metrics

    metrics = Metrics()
    metrics.graph_compiled("step", "one", 6.5, None)
    metrics.graph_compiled("encoder", "many", None, "RuntimeError: no C++ compiler")
    text = generate_latest(metrics.registry).decode()
    assert 'peft_t5_step_compiled{rows="1"} 1.0' in text and 'peft_t5_step_compile_seconds{rows="1"} 6.5' in text
    assert 'peft_t5_encoder_compiled{rows="2+"} -1.0' in text and "peft_t5_encoder_compile_seconds{" not in text
