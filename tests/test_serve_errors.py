"""What a hostile client or a careless operator sends gets a 4xx in the server's one shape, never a 500: rating with
a squad adapter loaded, unloading while requests wait, broken Unicode and paths, links out of the adapter root,
another rater's item, Starlette's own refusals; the served OpenAPI spec is right, and a bounded fuzz run of it
(schemathesis) finds no 5xx."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from xml.etree import ElementTree

import httpx
import pytest
from test_serve import AUTH, JOKES, KEY, make_adapter, post

from peft_t5.bank import AdapterBank
from peft_t5.errors import PeftT5Error
from peft_t5.serve.app import ServeSettings, create_app, running


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, task, seed in (("jokes", "jokes", 1), ("squad", "squad", 2), ("jokes2", "jokes", 3)):
        make_adapter(root / name, task, seed)
    return root


def serve(root, tmp_path, **options):
    """A server over a real socket with jokes and squad loaded, rating on (default systems) unless told."""
    bank = AdapterBank.load("tiny", {"jokes": str(root / "jokes"), "squad": str(root / "squad")})
    options = {"api_key": KEY, "adapter_root": str(root), "rate_questions": [{"question": q} for q in JOKES[:2]],
               "ratings": str(tmp_path / "ratings.db"), **options}
    return running(create_app(bank, ServeSettings(compile=False, **options)))


def errors_counted(url: str, status: int) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("peft_t5_errors_total{") and f'status="{status}"' in line)


def test_blind_rating_leaves_out_adapters_that_need_a_context_and_says_so(root, tmp_path):
    with serve(root, tmp_path) as url:
        item = httpx.get(url + "/v1/rate/next", params={"rater": "ann"}, headers=AUTH)
        assert item.status_code == 200 and len(item.json()["outputs"]) == 2  # base and jokes, not squad
        assert httpx.get(url + "/v1/adapters", headers=AUTH).json()["rating"] == {
            "systems": ["base", "jokes"], "left_out": ["squad"]}
    with pytest.raises(PeftT5Error, match="squad cannot be rated blind: its prompt needs context"):
        serve(root, tmp_path, rate_systems=["jokes", "squad"]).__enter__()


def test_rating_survives_unloading_and_reloading_other_adapters(root, tmp_path):
    with serve(root, tmp_path) as url:
        assert post(url, "/v1/adapters", {"name": "jokes2", "path": "jokes2"}).status_code == 201
        assert httpx.delete(url + "/v1/adapters/squad", headers=AUTH).status_code == 200
        assert post(url, "/v1/adapters", {"name": "squad", "path": "squad"}).status_code == 201
        for rater in ("ann", "bob", "cy"):
            assert httpx.get(url + "/v1/rate/next", params={"rater": rater}, headers=AUTH).status_code == 200
        refused = httpx.delete(url + "/v1/adapters/jokes", headers=AUTH)
        assert refused.status_code == 409 and "rated blind" in refused.json()["error"]


@pytest.mark.slow
def test_unloading_an_adapter_while_its_requests_wait_answers_each_with_its_output_or_a_404(root, tmp_path):
    reference = AdapterBank.load("tiny", {"jokes2": str(root / "jokes2")}).generate("jokes2", JOKES)
    with serve(root, tmp_path, rate_questions=[]) as url:
        for _ in range(3):  # named unlike its folder, so that no request loads it again on demand
            assert post(url, "/v1/adapters", {"name": "temp", "path": "jokes2"}).status_code == 201
            with ThreadPoolExecutor(9) as pool:
                waiting = [pool.submit(post, url, "/v1/generate", {"adapter": "temp", "inputs": JOKES})
                           for _ in range(8)]
                unload = pool.submit(httpx.delete, url + "/v1/adapters/temp", headers=AUTH)
                replies = [w.result() for w in waiting]
            assert unload.result().status_code == 200
            for reply in replies:
                if reply.status_code == 200:
                    assert [o["output"] for o in reply.json()["outputs"]] == reference
                else:
                    assert reply.status_code == 404, reply.text
                    assert "temp" in reply.json()["error"] and reply.json()["field"] == "adapter"
        assert errors_counted(url, 500) == 0


@pytest.mark.parametrize("body, status, message", [
    ('{"adapter": "jokes", "inputs": ["a\\ud800b"]}', 422, "inputs[0]: Value error, not valid Unicode text"),
    ('{"adapter": "squad", "inputs": [{"question": "q", "context": "\\udc00"}]}', 422, "inputs[0].context: Value error, not valid Unicode"),
    ({"adapter": "base", "inputs": [{"a": "b"}]}, 422, "base without prompt_of takes text inputs only"),
    (b'{"adapter": "jokes", "inputs": ["\xff\xfe"]}', 400, "the body is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, 400, "the body is not valid JSON"),
])
def test_broken_text_and_json_get_a_4xx_in_the_servers_shape(root, tmp_path, body, status, message):
    with serve(root, tmp_path, rate_questions=[]) as url:
        content = json.dumps(body) if isinstance(body, dict) else body
        reply = httpx.post(url + "/v1/generate", content=content, headers={**AUTH, "Content-Type": "application/json"})
        assert reply.status_code == status and message in reply.json()["error"], reply.text
        assert errors_counted(url, 500) == 0


def test_wrong_methods_and_unknown_routes_answer_in_the_servers_shape(root, tmp_path):
    with serve(root, tmp_path, rate_questions=[]) as url:
        wrong = httpx.put(url + "/v1/generate", headers=AUTH)
        assert wrong.status_code == 405 and wrong.json() == {"error": "PUT /v1/generate: Method Not Allowed"}
        assert httpx.put(url + "/v1/adapters", headers=AUTH).headers["allow"] == "GET, POST"
        missing = httpx.get(url + "/v2/nothing", headers=AUTH)
        assert missing.status_code == 404 and missing.json()["error"] == "GET /v2/nothing: Not Found"


@pytest.mark.parametrize("path, status, message", [
    ("jokes\x00x", 404, "no such adapter folder (no path holds a NUL byte"),
    ("a" * 4096 + "/x", 422, "path: String should have at most 4096 characters"),
    ("x" * 4096, 404, "or a name over 255 bytes"),
    ("/".join(["y" * 200] * 20), 404, "no such adapter folder"),
    ("../outside", 403, "outside the adapter root"),
], ids=["nul", "4098 characters", "4096-byte segment", "deep", "outside"])
def test_odd_adapter_paths_get_a_4xx(root, tmp_path, path, status, message):
    with serve(root, tmp_path, rate_questions=[]) as url:
        reply = post(url, "/v1/adapters", {"name": "odd", "path": path})
        assert reply.status_code == status and message in reply.json()["error"], reply.text


def test_a_file_linked_out_of_the_root_is_refused_and_its_content_never_shown(root, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"task": "jokes", "template": "{question}", "secret": "s3cr3t"}))
    linked = root / "linked"
    linked.mkdir()
    for f in (root / "jokes").iterdir():
        if f.is_file() and f.name != "peft_t5.json":
            os.link(f, linked / f.name)
    (linked / "peft_t5.json").symlink_to(secret)
    with serve(root, tmp_path, rate_questions=[]) as url:
        reply = post(url, "/v1/adapters", {"name": "linked", "path": "linked"})
        assert reply.status_code == 403 and "its peft_t5.json links out" in reply.json()["error"]
        assert "s3cr3t" not in httpx.get(url + "/v1/adapters", headers=AUTH).text


def test_an_item_shown_to_one_rater_cannot_be_rated_by_another(root, tmp_path):
    with serve(root, tmp_path, rate_systems=["base", "jokes"]) as url:
        item = httpx.get(url + "/v1/rate/next", params={"rater": "ann"}, headers=AUTH).json()
        scores = [{"funny": 5, "appropriate": 5}] * 2
        assert post(url, "/v1/ratings", {"id": item["id"], "rater": "ann", "scores": scores}).status_code == 201
        theft = post(url, "/v1/ratings", {"id": item["id"], "rater": "bob",
                                          "scores": [{"funny": 1, "appropriate": 1}] * 2})
        assert theft.status_code == 403 and "shown to another rater" in theft.json()["error"]
        funny = httpx.get(url + "/v1/ratings/summary", headers=AUTH).json()["systems"]["jokes"]["funny"]
        assert funny["mean"] == 5 and funny["count"] == 1  # ann's rating stands


def test_a_500_is_answered_in_the_servers_shape_and_counted(root, tmp_path, monkeypatch):
    with serve(root, tmp_path, rate_questions=[]) as url:
        monkeypatch.setattr(AdapterBank, "sources", lambda *a, **k: 1 / 0)  # a bug inside a route
        reply = post(url, "/v1/generate", {"adapter": "jokes", "inputs": ["x"]})
        assert reply.status_code == 500 and reply.json() == {"error": "internal error; the server logged it"}
        assert errors_counted(url, 500) == 1
        assert 'peft_t5_requests_total{route="/v1/generate",status="500"} 1.0' in \
            httpx.get(url + "/metrics", headers=AUTH).text


def test_the_page_without_a_key_tells_a_browser_how_to_pass_it(root, tmp_path):
    with serve(root, tmp_path, rate_questions=[]) as url:
        page = httpx.get(url + "/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "/?key=KEY" in page.text
        assert httpx.get(url + "/").json()["error"].startswith("missing or wrong API key")


def test_the_served_spec_states_the_error_shape_and_the_limits_the_server_enforces(root, tmp_path):
    with serve(root, tmp_path, rate_questions=[], max_inputs=4) as url:
        spec = httpx.get(url + "/openapi.json").json()  # no key needed: routes and limits, no data
        assert httpx.get(url + "/docs").status_code == 200
    assert "HTTPValidationError" not in json.dumps(spec) and '"detail"' not in json.dumps(spec)
    generate = spec["paths"]["/v1/generate"]["post"]["responses"]
    assert {"400", "401", "404", "413", "422"} <= set(generate)
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]
    assert generate["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    schemas = spec["components"]["schemas"]
    assert schemas["GenerateRequest"]["properties"]["inputs"]["minItems"] == 1
    assert schemas["GenerateRequest"]["properties"]["inputs"]["maxItems"] == 4
    assert schemas["LoadRequest"]["properties"]["name"]["pattern"].startswith("^[A-Za-z0-9]")


@pytest.mark.slow
@pytest.mark.parametrize("key", [True, False], ids=["with the key", "without"])
def test_fuzzing_the_served_spec_finds_no_5xx_and_every_reply_conforms(root, tmp_path, key):
    """schemathesis's own CLI (not its pytest plugin, which breaks with each pytest release) runs every phase and
    check, deterministically, against a server with small limits so that each generated request is cheap."""
    report = tmp_path / "junit.xml"
    with serve(root, tmp_path, max_inputs=3, max_input_chars=200, max_new_tokens=4) as url:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
             *(["-H", f"Authorization: Bearer {KEY}"] if key else []),
             "--checks", "all", "--generation-deterministic", "--max-examples", "40" if key else "10", "--no-color",
             "--report", "junit", "--report-junit-path", str(report)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes there, not in the checkout
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    tested = {case.get("name") for case in suite.iter("testcase")}
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert {"POST /v1/generate", "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/adapters",
            "GET /v1/models/{model}"} <= tested, tested
