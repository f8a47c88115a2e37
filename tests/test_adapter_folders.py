"""Adapter folders as the disk has them: a folder that changes while it loads (deleted, truncated, rewritten) is a 4xx
in one line and leaves no half-loaded adapter; weights that do not match their config are refused everywhere a folder
is read; /v1/models lists only what would load and its retrieve agrees with a request; adapter names that occur in a
PEFT tuner's prefix load whole."""
import json
import random
import shutil
import threading
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability import run_cli_alone
from test_serve import JOKES, make_adapter

from peft_t5.adapters import save_adapter
from peft_t5.bank import AdapterBank
from peft_t5.errors import PeftT5Error
from peft_t5.methods import get_method
from peft_t5.modeling import add_adapter, tiny_model, tiny_tokenizer
from peft_t5.serve.app import ServeSettings, create_app, running


def make_method_adapter(path: Path, method: str, seed: int) -> str:
    """An adapter of `method` with random non-zero weights, saved as training saves one."""
    torch.manual_seed(seed)
    chosen = get_method(method)
    model = add_adapter(tiny_model(), chosen.build(chosen.settings({}), 100))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(model, tiny_tokenizer(), path, {"task": "jokes", "base_model": "tiny", "method": method,
                                                 "template": "{question}"}, "test adapter")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    make_adapter(root / "jokes", "jokes", 1)
    make_adapter(root / "racer", "jokes", 2)
    make_method_adapter(root / "ia3", "ia3", 3)
    make_method_adapter(root / "pt", "prompt_tuning", 4)
    shutil.copytree(root / "racer", root / "mixed")  # LoRA weights with an IA3 config
    shutil.copy(root / "ia3" / "adapter_config.json", root / "mixed" / "adapter_config.json")
    shutil.copytree(root / "ia3", root / "reverse")  # IA3 weights with a LoRA config
    shutil.copy(root / "racer" / "adapter_config.json", root / "reverse" / "adapter_config.json")
    shutil.copytree(root / "racer", root / "partial")  # LoRA weights of some of the layers its config names
    weights = load_file(root / "partial" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".v." not in k}, root / "partial" / "adapter_model.safetensors")
    return root


def mismatch(folder: Path) -> str:
    """The one line a folder whose weights do not match its config gets, up to its first missing key."""
    return f"{folder}: adapter_model.safetensors does not hold the weights its adapter_config.json"


def test_weights_that_do_not_match_their_config_are_refused_wherever_a_folder_is_read(root, tmp_path, capsys):
    from peft_t5.commands.evaluate import evaluate_main
    from peft_t5.commands.generate import generate_main
    from peft_t5.commands.merge import merge_main

    for name, method, said in (("mixed", "ia3", "missing every *ia3_l* tensor (it holds base_model.model."),
                               ("reverse", "lora", "missing every *lora_A* tensor (it holds base_model.model."),
                               ("partial", "lora", "missing base_model.model.decoder.block.0.layer.0.SelfAttention.v."
                                                   "lora_A.weight and 11 more")):
        folder = root / name
        expected = mismatch(folder) + f" ({method}) makes: {said}"
        with pytest.raises(PeftT5Error, match="makes: missing") as raised:  # serve at start, generate
            AdapterBank.load("tiny", {name: str(folder)})
        assert str(raised.value).startswith(expected), raised.value
        for command, argv in ((generate_main, ["--adapter", f"{name}={folder}", "--adapter_name", name, "Why?"]),
                              (merge_main, ["--adapter", str(folder), "--output_dir", str(tmp_path / "merged")]),
                              (evaluate_main, ["--task", "jokes", "--adapter", str(folder), "--predictions",
                                               str(tmp_path / "preds.json"), "--limit", "2"])):
            status, line = run_cli_alone(command, argv, capsys)
            assert status == 2 and line.startswith("error: " + expected), line
        assert not (tmp_path / "merged").exists() and not (tmp_path / "preds.json").exists()
    bank = AdapterBank.load("tiny", {"jokes": str(root / "jokes")})  # a bank keeps nothing of a refused folder
    for name in ("mixed", "partial"):
        with pytest.raises(PeftT5Error, match="makes: missing"):
            bank.add(name, str(root / name))
    assert bank.names == ["base", "jokes"] and len(bank.models()) == 2
    assert bank.generate("jokes", JOKES) == AdapterBank.load("tiny", {"jokes": str(root / "jokes")}).generate(
        "jokes", JOKES)


def test_resume_refuses_a_checkpoint_whose_weights_are_of_another_method(root, tmp_path):
    import peft_t5

    out = tmp_path / "run"
    settings = dict(task="jokes", model="tiny", max_steps=2, save_strategy="steps", save_steps=1, eval_strategy="no",
                    load_best_model_at_end=False, eval_on_start=False, report_to="none", sample_generations=0,
                    disable_tqdm=True, output_dir=str(out))
    peft_t5.train(**settings)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    shutil.copy(root / "ia3" / "adapter_model.safetensors", checkpoint / "adapter_model.safetensors")
    with pytest.raises(PeftT5Error) as raised:
        peft_t5.train(**{**settings, "max_steps": 3}, resume=True)
    assert str(raised.value).startswith(mismatch(checkpoint) + " (lora) makes: missing every *lora_A* tensor")


def serve(root, **settings):
    app = create_app(AdapterBank.load("tiny", {"jokes": str(root / "jokes")}),
                     ServeSettings(compile=False, adapter_root=str(root), **settings))
    return app, running(app)


def ask(url, adapter):
    return httpx.post(url + "/v1/generate", timeout=300, json={"adapter": adapter, "inputs": JOKES[:1],
                                                                "max_new_tokens": 4})


def test_a_server_refuses_mismatched_folders_on_demand_and_by_post(root):
    app, server = serve(root)
    with server as url:
        for name, method in (("mixed", "ia3"), ("reverse", "lora")):
            reply = ask(url, name)
            assert reply.status_code == 422 and mismatch(root / name) + f" ({method}) makes: missing " in \
                reply.json()["error"], reply.text
            posted = httpx.post(url + "/v1/adapters", json={"name": f"{name}2", "path": name})
            assert posted.status_code == 422 and "does not hold the weights" in posted.json()["error"]
        assert app.state.bank.names == ["base", "jokes"]


def test_a_folder_that_changes_during_its_load_is_a_4xx_and_leaves_nothing_half_loaded(root, tmp_path,
                                                                                      monkeypatch):
    import peft_t5.bank

    folder = tmp_path / "root"
    shutil.copytree(root / "jokes", folder / "jokes")
    racer = folder / "racer"
    expected = AdapterBank.load("tiny", {"racer": str(root / "racer")}).generate("racer", JOKES[:1],
                                                                                  max_new_tokens=4)
    ia3 = AdapterBank.load("tiny", {"ia3": str(root / "ia3")}).generate("ia3", JOKES[:1], max_new_tokens=4)
    fits = peft_t5.bank.check_adapter_fits

    def deleted_while_peft_loads(*args):  # the folder goes once its copy is taken, before PEFT reads it
        shutil.rmtree(racer, ignore_errors=True)
        return fits(*args)

    app, server = serve(folder)
    with server as url:
        shutil.copytree(root / "racer", racer)
        monkeypatch.setattr(peft_t5.bank, "check_adapter_fits", deleted_while_peft_loads)
        reply = ask(url, "racer")  # the load read one version of the folder: it answers from it
        assert reply.status_code == 200 and [o["output"] for o in reply.json()["outputs"]] == expected
        monkeypatch.undo()
        httpx.delete(url + "/v1/adapters/racer")

        changes = {"deleted": lambda: shutil.rmtree(racer, ignore_errors=True),
                   "truncated": lambda: truncate(racer / "adapter_model.safetensors"),
                   "config gone": lambda: (racer / "adapter_config.json").unlink(missing_ok=True),
                   "rewritten": lambda: rewrite(racer, root / "ia3")}
        outcomes, rng = [], random.Random(0)
        for attempt in range(160):  # the change lands anywhere in the load, or before or after it
            shutil.rmtree(racer, ignore_errors=True)
            shutil.copytree(root / "racer", racer)
            change = list(changes)[attempt % len(changes)]
            racing = threading.Timer(rng.uniform(0, 0.03), changes[change])
            racing.start()
            reply = ask(url, "racer")
            racing.join()
            assert reply.status_code in (200, 404, 409, 422), (change, reply.status_code, reply.text)
            assert "\n" not in reply.json().get("error", ""), reply.text
            outcomes.append(reply.status_code)
            bank = app.state.bank
            if "racer" in bank.names:  # loaded whole: it answers as the folder did (before or after it was
                # rewritten as the IA3 adapter), and it is unloaded again
                assert reply.status_code == 200 and [o["output"] for o in reply.json()["outputs"]] in (expected, ia3)
                assert httpx.delete(url + "/v1/adapters/racer").status_code == 200
            assert bank.names == ["base", "jokes"] and all(
                bank.peft_name("racer") not in holder.peft_config for holder in bank.models()[1:])
        shutil.rmtree(racer, ignore_errors=True)
        shutil.copytree(root / "racer", racer)
        restored = ask(url, "racer")  # the next request for a restored folder works
        assert restored.status_code == 200 and [o["output"] for o in restored.json()["outputs"]] == expected
        assert 'status="500"' not in httpx.get(url + "/metrics").text
    assert len(set(outcomes)) > 1, outcomes  # the races landed in different places


def truncate(path: Path) -> None:
    try:
        with open(path, "r+b") as f:
            f.truncate(max(0, f.seek(0, 2) // 2))
    except FileNotFoundError:
        pass


def rewrite(folder: Path, other: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            shutil.copy(other / name, folder / name)
        except FileNotFoundError:
            pass


def test_models_lists_only_what_would_load_and_retrieve_agrees_with_a_request(root, tmp_path):
    folder = tmp_path / "root"
    shutil.copytree(root, folder)
    outside = tmp_path / "outside"
    make_adapter(outside / "evil", "jokes", 9)
    (folder / "evil").symlink_to(outside / "evil")  # a link out of the root: 403 when used
    (folder / "half").mkdir()  # half-written: a config, no weights yet
    shutil.copy(root / "jokes" / "adapter_config.json", folder / "half")
    shutil.copytree(root / "jokes", folder / "corrupt")
    truncate(folder / "corrupt" / "adapter_model.safetensors")
    app, server = serve(folder)
    with server as url:
        listed = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        # not evil, half, corrupt, mixed nor reverse; partial's missing layers show only against the base, at load
        assert listed == ["base", "jokes", "ia3", "partial", "pt", "racer"]
        for name in ("evil", "half", "corrupt", "mixed"):
            retrieved, asked = httpx.get(url + f"/v1/models/{name}"), ask(url, name)
            assert retrieved.status_code == asked.status_code and asked.status_code in (403, 404, 422), name
            assert retrieved.json()["error"]["message"] == asked.json()["error"], name
        assert httpx.get(url + "/v1/models/racer").json()["id"] == "racer"
        assert httpx.get(url + "/v1/models/nope").status_code == 404


def test_adapter_names_inside_a_tuners_prefix_load_whole_and_peft_never_warns(root, tmp_path):
    names = {"pt": str(root / "pt"), "ra": str(root / "racer"), "lora_": str(root / "jokes"), "ia3": str(root / "ia3"),
             "a.b": str(root / "jokes")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = AdapterBank.load("tiny", names)
    assert not [w for w in caught if "should not be contained in the prefix" in str(w.message)
                or "missing adapter keys" in str(w.message)]
    for name, path in names.items():
        alone = AdapterBank.load("tiny", {"x": path}).generate("x", JOKES[:2], max_new_tokens=6)
        assert bank.generate(name, JOKES[:2], max_new_tokens=6) == alone, name
    assert json.loads(Path(names["pt"], "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
