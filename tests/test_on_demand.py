"""Adapters loaded on demand from --adapter_root: the first request loads one (once, however many ask at once), later
ones reuse it, --max_loaded_adapters evicts the least recently used adapter that is neither pinned nor decoding,
and every folder that cannot be loaded is refused naming it, while the others' rows keep decoding."""
import re
import shutil
import threading

import httpx
import pytest
import torch
from test_serve import AUTH, JOKES, KEY, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("on_demand")
    for seed, name in enumerate(["pinned", "north", "south", "west"]):
        make_adapter(root / name, "jokes", seed + 1)
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(outside / "elsewhere", "jokes", 9)
    (root / "linked").symlink_to(outside / "elsewhere")
    shutil.copytree(root / "north", root / "pickled")
    torch.save(load_file(root / "pickled" / "adapter_model.safetensors"), root / "pickled" / "adapter_model.bin")
    (root / "pickled" / "adapter_model.safetensors").unlink()
    (root / "notes").mkdir()  # a folder, not an adapter
    return root


@pytest.fixture(scope="module")
def reference(root):
    return {name: AdapterBank.load("tiny", {name: str(root / name)}).generate(name, JOKES[:2], max_new_tokens=8)
            for name in ("north", "south", "west")}


def ask(url, adapter, tokens=8, **extra):
    return httpx.post(url + "/v1/generate", headers=AUTH, timeout=120, json={
        "adapter": adapter, "inputs": JOKES[:2], "max_new_tokens": tokens, **extra})


def loads(url) -> int:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return int(float(re.search(r"^peft_t5_adapter_load_seconds_count (\S+)", text, re.M)[1]))


def evictions(url) -> int:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return int(float(re.search(r"^peft_t5_adapter_evictions_total (\S+)", text, re.M)[1]))


def loaded(url) -> list[str]:
    return [a["name"] for a in httpx.get(url + "/v1/adapters", headers=AUTH).json()["adapters"]]


def server_app(root, **settings):
    bank = AdapterBank.load("tiny", {"pinned": str(root / "pinned")})
    return create_app(bank, ServeSettings(compile=False, api_key=KEY, adapter_root=str(root), **settings))


def serve(root, **settings):
    return running(server_app(root, **settings))


@pytest.mark.slow
def test_the_first_request_loads_once_and_later_ones_reuse_it(root, reference):
    with serve(root) as url:
        models = [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]]
        assert {"base", "pinned", "north", "south", "west"} <= set(models)
        assert not {"notes", "linked", "pickled"} & set(models)  # not an adapter, a link out, pickled: none would load
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(ask(url, "north"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in replies] == [200] * 4
        assert all([o["output"] for o in r.json()["outputs"]] == reference["north"] for r in replies)
        assert loads(url) == 1  # four concurrent first requests, one load
        assert ask(url, "north").status_code == 200 and loads(url) == 1 and loaded(url) == ["base", "pinned", "north"]


@pytest.mark.slow
def test_the_lru_evicts_only_unpinned_adapters_with_no_rows_in_flight(root, reference):
    app = server_app(root, max_loaded_adapters=2, max_new_tokens=4000, max_request_tokens=100_000, adapter_wait=1.0)
    engine = app.state.engine
    with running(app) as url:
        assert ask(url, "north").status_code == 200 and loaded(url) == ["base", "pinned", "north"]
        b = ask(url, "south")  # room for one: "north" (least recent, unpinned, idle) goes, "pinned" stays
        assert [o["output"] for o in b.json()["outputs"]] == reference["south"]
        assert loaded(url) == ["base", "pinned", "south"] and evictions(url) == 1
        body = {"adapter": "south", "inputs": JOKES[:2], "max_new_tokens": 3000, "min_new_tokens": 3000,
                "stream": True}
        with httpx.stream("POST", url + "/v1/generate", headers=AUTH, json=body, timeout=60) as long:
            lines = long.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)  # "south" is decoding: it cannot be evicted, nor can "pinned"
            with engine.holding():  # and it goes on decoding, unfinished, while "west" waits its 1 s for room
                refused = ask(url, "west")
            assert refused.status_code == 503
            assert refused.json()["error"] == ("adapter 'west' could not be loaded from the adapter root: all 2 loaded "
                                               "adapters (--max_loaded_adapters 2) stayed pinned or in use for 1 s; "
                                               "retry shortly")
            assert loaded(url) == ["base", "pinned", "south"]
        engine.wait_until(lambda: engine.active_rows == 0)  # the client hung up: its rows leave at the next step
        c = ask(url, "west")  # "south" is idle now
        assert [o["output"] for o in c.json()["outputs"]] == reference["west"] and loaded(url) == ["base", "pinned", "west"]
        assert evictions(url) == 2


def test_folders_that_cannot_be_loaded_are_refused_naming_them(root):
    with serve(root) as url:
        for adapter, status, message in [
                ("linked", 403, "adapter 'linked': 'linked' is outside the adapter root; give a folder under it"),
                ("pickled", 422, "adapter_model.bin: pickled weights can run code when loaded and are refused"),
                ("notes", 404, "notes: no adapter_config.json, so not an adapter folder"),
                ("../north", 404, "adapter: no adapter named '../north'")]:
            reply = ask(url, adapter)
            assert reply.status_code == status and message in reply.json()["error"], (adapter, reply.text)
        completion = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                                json={"model": "pickled", "prompt": "Why?", "max_tokens": 4})
        assert completion.status_code == 422 and completion.json()["error"]["param"] == "model"
        assert ask(url, "south").status_code == 200  # and the server goes on


def test_one_engine_serves_every_method_and_no_other_path_is_left():
    from pathlib import Path

    import peft_t5

    package = Path(peft_t5.__file__).parent
    code = {p: p.read_text() for p in package.rglob("*.py")}
    readme = (package.parent / "README.md").read_text()
    assert not (package / "serve" / "batcher.py").exists()
    for text in [*code.values(), readme]:
        assert "--engine" not in text and "Batcher" not in text and "static batch" not in text
