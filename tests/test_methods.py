"""Every PEFT method of the table trains (the loss moves), saves as a plain PEFT folder that reloads to identical
logits, merges within the LoRA bound where PEFT can merge it (and is refused in one line where not), and serves;
AdaLoRA's rank budget really shrinks; LoRA+ gives B the larger learning rate; a flag of another method is refused."""
import json
import re

import pytest
import torch
from peft import PeftModel
from test_reliability import FAST, run_cli

from peft_t5.bank import AdapterBank
from peft_t5.cli import run
from peft_t5.commands.merge import merge_main
from peft_t5.commands.train import train_main as train
from peft_t5.merging import LORA_TOLERANCE
from peft_t5.methods import METHODS, get_method
from peft_t5.modeling import add_adapter, load_base_model, tiny_model, tiny_tokenizer

QUESTIONS = ["Why did the chicken cross the road?", "What do you call a fish with no eyes?"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny jokes adapter per method, trained 8 steps at a high learning rate."""
    root = tmp_path_factory.mktemp("methods")
    for name in METHODS:
        train(["--task", "jokes", "--method", name, "--output_dir", str(root / name), *FAST, "--max_steps", "8",
               "--learning_rate", "0.01", "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_records_itself_and_reloads_with_plain_peft(trained, name):
    meta = json.loads((trained / name / "peft_t5.json").read_text())
    assert meta["method"] == name and meta["settings"] == get_method(name).settings({})
    assert meta["metrics"]["eval_loss"] < meta["eval_loss_before"] - 0.01, meta["metrics"]  # it learned something
    config = json.loads((trained / name / "adapter_config.json").read_text())
    assert get_method(name).name in (config["peft_type"].lower(), "dora" if config.get("use_dora") else "")


@pytest.mark.parametrize("name", list(METHODS))
def test_save_then_plain_peft_reload_gives_identical_logits(tmp_path, name):
    torch.manual_seed(0)
    method = get_method(name)
    model = add_adapter(tiny_model(), method.build(method.settings({}), 100))
    with torch.no_grad():  # move every trainable tensor off its (often identity) start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = tiny_tokenizer()(QUESTIONS, return_tensors="pt", padding=True)
    decoder = torch.zeros_like(batch.input_ids[:, :4])
    with torch.no_grad():
        before = model(**batch, decoder_input_ids=decoder).logits
        model.save_pretrained(tmp_path)
        after = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()(**batch, decoder_input_ids=decoder).logits
    assert (after - before).abs().max().item() < 1e-6


@pytest.mark.slow  # on the adapters this module trains once
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_evaluates_and_generates_from_the_command_line(trained, tmp_path, capsys, name):
    from peft_t5.commands.evaluate import evaluate_main
    from peft_t5.commands.generate import generate_main

    predictions = tmp_path / "preds.json"
    status, line = run_cli(evaluate_main, ["--task", "jokes", "--adapter", str(trained / name), "--predictions",
                                           str(predictions), "--limit", "4", "--max_new_tokens", "8"], capsys)
    assert status == 0, line
    assert len(json.loads(predictions.read_text())) == 4 and predictions.with_name("preds.metrics.json").is_file()
    assert run(generate_main, ["--adapter", f"{name}={trained / name}", "--adapter_name", name, "--max_new_tokens", "8",
                               *QUESTIONS]) == 0
    printed = capsys.readouterr().out
    expected = AdapterBank.load("tiny", {name: str(trained / name)}).generate(name, QUESTIONS, max_new_tokens=8)
    for question, answer in zip(QUESTIONS, expected):
        assert f"Q: {question}\n{name}: {answer or '(empty output)'}\n" in printed


@pytest.mark.slow  # on the adapters this module trains once
@pytest.mark.parametrize("name", list(METHODS))
def test_merge_where_peft_can_and_a_one_line_refusal_where_not(trained, tmp_path, capsys, name):
    status, line = run_cli(merge_main, ["--adapter", str(trained / name), "--output_dir", str(tmp_path / "merged")], capsys)
    if get_method(name).can_merge:
        assert status == 0, line
        diff = json.loads((tmp_path / "merged" / "peft_t5.json").read_text())["max_logit_diff"]
        assert diff <= LORA_TOLERANCE
    else:
        assert status == 2 and line == (f"error: {trained / name}: a {name} adapter cannot be merged: its virtual "
                                        "tokens are inputs prepended to every source, not weights, so there is "
                                        "nothing to add to the base; serve or load it as an adapter")
        assert not (tmp_path / "merged").exists()


@pytest.mark.slow  # on the adapters this module trains once
@pytest.mark.parametrize("name", [n for n in METHODS if n != "lora"])
def test_two_adapters_of_a_method_serve_in_sub_batches_equal_to_one_at_a_time(trained, tmp_path, name):
    import shutil

    shutil.copytree(trained / name, tmp_path / "again")
    bank = AdapterBank.load("tiny", {"a": str(trained / name), "b": str(tmp_path / "again")})
    alone = bank.generate("a", QUESTIONS, max_new_tokens=8)
    mixed = bank.generate_mixed([("a", QUESTIONS[0]), ("b", QUESTIONS[1]), ("a", QUESTIONS[1])], max_new_tokens=8)
    assert mixed == [alone[0], alone[1], alone[1]] and not bank.mixes({"a", "b"})


def generate_py(capsys, adapters: dict, task: str) -> list[str]:
    """What scripts/generate.py prints for QUESTIONS, as a list of outputs."""
    from peft_t5.commands.generate import generate_main

    specs = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    assert run(generate_main, [*specs, "--adapter_name", task, "--max_new_tokens", "8", *QUESTIONS]) == 0
    return re.findall(rf"^{task}: (.*)$", capsys.readouterr().out, re.MULTILINE)


@pytest.fixture(scope="module")
def distinct(tmp_path_factory):
    """A base whose greedy output wanders over the vocabulary (the tiny T5 ends at once, which would hide a prompt
    that is not applied), and one adapter per method on it, its trainable weights moved well off their start."""
    from test_engine import spread_weights

    from peft_t5.adapters import save_adapter

    root = tmp_path_factory.mktemp("distinct")
    torch.manual_seed(0)
    spread_weights(tiny_model(), 0.2).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    for seed, name in enumerate([*METHODS, "ia3_b"]):  # and a second IA3 adapter, to switch between
        torch.manual_seed(seed)
        method = get_method(name.removesuffix("_b"))
        model = add_adapter(load_base_model(str(root / "base")), method.build(method.settings({}), 100))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        save_adapter(model, tiny_tokenizer(), root / name, {"task": "jokes", "base_model": str(root / "base"),
                                                            "method": method.name, "template": "{question}"},
                     "test adapter")
    return root


@pytest.mark.slow
def test_one_server_decodes_every_method_beside_the_others_as_generate_py_does_alone(distinct, capsys):
    """One server, one base, an adapter of each of the six methods (two of IA3, made active in turn) and the bare
    base, every request queued before the first step into 5 rows (so rows wait, join mid-flight and leave, whatever
    the machine's speed): each answers as generate.py does with that adapter alone on its base."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from peft_t5.serve.app import ServeSettings, create_app, running

    adapters = {name: str(distinct / name) for name in [*METHODS, "ia3_b"]}
    expected = {name: generate_py(capsys, {name: path}, name) for name, path in adapters.items()}
    expected["base"] = generate_py(capsys, {"lora": adapters["lora"]}, "base")
    assert len({tuple(outputs) for outputs in expected.values()}) == 8, expected  # eight different answers
    bank = AdapterBank.load(None, adapters)  # the base recorded in the adapters

    def ask(adapter):
        return httpx.post(url + "/v1/generate", timeout=300, json={
            "adapter": adapter, "inputs": QUESTIONS, "max_new_tokens": 8,
            **({"prompt_of": "lora"} if adapter == "base" else {})})
    app = create_app(bank, ServeSettings(compile=False, max_rows=5, max_rows_per_request=2))
    engine = app.state.engine
    with running(app) as url, ThreadPoolExecutor(8) as pool:
        with engine.holding():  # the first step starts once every request waits
            sent = [pool.submit(ask, adapter) for adapter in expected]
            engine.wait_until(lambda: engine.waiting_rows == len(expected) * len(QUESTIONS))
        replies = dict(zip(expected, [reply.result() for reply in sent]))
        listed = {a["name"]: a for a in httpx.get(url + "/v1/adapters").json()["adapters"]}
        steps = httpx.get(url + "/metrics").text
    served = {name: [o["output"] or "(empty output)" for o in r.json()["outputs"]] for name, r in replies.items()}
    assert served == expected
    # a request holds at most 2 rows, so steps of more rows ran several requests' (methods') rows together
    at_most_2 = float(re.search(r'peft_t5_step_rows_bucket\{le="2.0"\} (\S+)', steps)[1])
    assert float(re.search(r"peft_t5_step_rows_count (\S+)", steps)[1]) > at_most_2
    assert listed["lora"]["batches"] == "mixed per row with other adapters"
    assert listed["ia3"]["method"] == "ia3" and listed["ia3"]["batches"] == "a forward pass of its own each step"


@pytest.mark.slow  # on the adapters this module trains once
def test_adapters_of_different_methods_share_the_base_layers_and_come_and_go(trained):
    bank = AdapterBank.load("tiny", {"l": str(trained / "lora"), "i": str(trained / "ia3"),
                                     "a": str(trained / "adalora"), "b": str(trained / "adalora")})
    models = bank.models()
    assert len(models) == 5  # the base, one PeftModel for LoRA, IA3 and each AdaLoRA adapter (PEFT holds one)
    weights = [{p.data_ptr() for n, p in m.named_parameters() if n.endswith("shared.weight")} for m in models]
    assert all(w == weights[0] and len(w) == 1 for w in weights)  # one embedding in memory for all of them
    before = bank.generate("l", QUESTIONS, max_new_tokens=8)
    bank.remove("i")
    assert len(bank.models()) == 4 and bank.generate("l", QUESTIONS, max_new_tokens=8) == before
    bank.add("i", str(trained / "ia3"))
    assert bank.generate("i", QUESTIONS, max_new_tokens=8) == AdapterBank.load(
        "tiny", {"i": str(trained / "ia3")}).generate("i", QUESTIONS, max_new_tokens=8)
    bank = AdapterBank.load("tiny", {"l": str(trained / "lora"), "d": str(trained / "dora")})  # one PEFT type
    assert len(bank.models()) == 2 and not bank.mixes({"l", "d"}) and bank.mixes({"l", "base"})


@pytest.mark.slow  # on the adapters this module trains once
def test_adalora_shrinks_its_rank_budget_during_training(trained):
    config = json.loads((trained / "adalora" / "adapter_config.json").read_text())
    ranks = list((config["rank_pattern"] or {}).values())
    assert ranks, "no rank was reallocated"
    kept = sum(sum(r) for r in ranks)
    assert kept < config["init_r"] * len(ranks)  # fewer singular values kept than it started with
    assert kept <= config["target_r"] * len(ranks) + len(ranks)


def test_adalora_adds_peft_s_orthogonality_penalty_to_the_training_loss_and_not_to_evaluation(tmp_path):
    from transformers import Seq2SeqTrainer

    from peft_t5.arguments import TrainingArguments
    from peft_t5.data import tokenize
    from peft_t5.tasks import get_task, jokes
    from peft_t5.trainer import adalora_orthogonality, build_trainer

    tokenizer, task, method = tiny_tokenizer(), get_task("jokes"), get_method("adalora")
    dataset, _ = tokenize(task, jokes.load_splits(jokes.SAMPLE)["train"][:4], tokenizer)
    model = add_adapter(tiny_model(), method.build(method.settings({"orth_reg_weight": 0.3}), 100))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", eval_strategy="no",
                             load_best_model_at_end=False, dataloader_pin_memory=False)
    trainer = build_trainer(model, tokenizer, task, dataset, None, args, [], 64, 32)
    batch = trainer.data_collator([{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")}
                                   for i in range(4)])
    model.eval()
    with torch.no_grad():  # PEFT's own: added to the loss T5 computes, inside AdaLoraModel.forward
        by_peft = (model(**batch).loss - model.base_model.model(**batch).loss) / 0.3
        assert abs(adalora_orthogonality(model) - by_peft) < 1e-5 and by_peft > 0.1
        assert trainer.compute_loss(model, dict(batch)) == Seq2SeqTrainer.compute_loss(trainer, model, dict(batch))
        model.train()
        torch.manual_seed(0)  # the same dropout in both
        penalised = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(0)
        plain = Seq2SeqTrainer.compute_loss(trainer, model, dict(batch))
    assert abs((penalised - plain) - 0.3 * by_peft) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_as_plain_lora_for_the_original_base(tmp_path, init):
    """PiSSA and OLoRA train on a base with their starting directions taken out; the saved adapter, converted by
    PEFT, gives the trained model's logits on the original base and leaves that base's weights as they were."""
    out = tmp_path / "out"
    train(["--task", "jokes", "--method", "lora", "--init_lora_weights", init, "--output_dir", str(out), *FAST,
           "--max_steps", "4", "--learning_rate", "0.01", "--eval_strategy", "no", "--load_best_model_at_end",
           "false", "--save_strategy", "steps", "--save_steps", "4"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 32  # plain LoRA, twice the rank
    batch = tiny_tokenizer()(QUESTIONS, return_tensors="pt", padding=True)
    decoder = torch.zeros_like(batch.input_ids[:, :4])
    base = tiny_model()
    original = [(p, p.clone()) for p in base.parameters()]
    with torch.no_grad():  # the checkpoint is the model as trained: loading it re-derives the changed base
        as_trained = PeftModel.from_pretrained(tiny_model(), out / "checkpoints" / "checkpoint-4").eval()
        expected = as_trained(**batch, decoder_input_ids=decoder).logits
        saved = PeftModel.from_pretrained(base, out).eval()
        got = saved(**batch, decoder_input_ids=decoder).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (expected - tiny_model()(**batch, decoder_input_ids=decoder).logits).abs().max().item() > 1e-3
    assert all(torch.equal(p, before) for p, before in original)  # the base's own weights, as they were
    from peft_t5.errors import PeftT5Error

    with pytest.raises(PeftT5Error, match=rf"checkpoint-4: a {init} adapter saved for the base it changed"):
        AdapterBank.load("tiny", {"a": str(out), "b": str(out / "checkpoints" / "checkpoint-4")})


def test_loraplus_gives_b_a_larger_learning_rate_than_a(tmp_path):
    from peft_t5.arguments import TrainingArguments
    from peft_t5.data import tokenize
    from peft_t5.modeling import add_lora
    from peft_t5.tasks import get_task, jokes
    from peft_t5.trainer import build_trainer

    tokenizer, task = tiny_tokenizer(), get_task("jokes")
    dataset, _ = tokenize(task, jokes.load_splits(jokes.SAMPLE)["train"][:8], tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", learning_rate=1e-3,
                             eval_strategy="no", load_best_model_at_end=False, dataloader_pin_memory=False)
    model = add_lora(tiny_model())
    trainer = build_trainer(model, tokenizer, task, dataset, None, args, [], 64, 32, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {("lora_B" if "lora_B" in names[id(p)] else "lora_A"): g["lr"]
           for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs == {"lora_A": 1e-3, "lora_B": 16e-3}


@pytest.mark.parametrize("argv, message", [
    (["--method", "ia3", "--lora_r", "8"], "--lora_r does not apply to --method ia3 (it takes --layers)"),
    (["--method", "prompt_tuning", "--target_modules", "q"],
     "--target_modules does not apply to --method prompt_tuning (it takes --num_virtual_tokens)"),
    (["--method", "lora", "--num_virtual_tokens", "5"], "--num_virtual_tokens does not apply to --method lora"),
    (["--method", "lora", "--orth_reg_weight", "0.1"], "--orth_reg_weight does not apply to --method lora"),
    (["--method", "adalora", "--orth_reg_weight", "-1"], "--orth_reg_weight -1.0: must be at least 0"),
    (["--method", "adalora", "--init_r", "2", "--target_r", "4"], "--target_r 4 is over --init_r 2"),
    (["--method", "prefix_tuning"], "--method prefix_tuning: prefix tuning on an encoder-decoder puts its prefix in "
                                    "the decoder's cache"),
])
def test_a_flag_of_another_method_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, argv, message):
    status, line = run_cli(train, ["--task", "jokes", "--output_dir", str(tmp_path / "out"), *FAST, *argv], capsys)
    assert status == 2 and message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_estimate_counts_each_methods_trainable_parameters_from_the_shapes_of_t5():
    from pathlib import Path

    from peft_t5.estimate import estimate, format_estimate

    fixture = Path(__file__).parent / "fixtures" / "flan-t5-large"
    result = estimate(str(fixture))
    counts = {name: row["trainable_parameters"] for name, row in result["methods"].items()}
    d, ff, layers, r = 1024, 2816, 24, 16  # flan-t5-large: d_model, d_ff, layers each side; the default rank
    attention = layers + 2 * layers  # encoder self-attention, decoder self- and cross-attention blocks
    assert counts["lora"] == attention * 2 * r * (d + d) == 4_718_592  # q and v, A and B each
    assert counts["dora"] == counts["lora"] + attention * 2 * d  # plus a magnitude vector per adapted layer
    assert counts["ia3"] == attention * 2 * d + 2 * layers * ff == 282_624  # k and v outputs, wo's input
    assert counts["prompt_tuning"] == 20 * d * 2  # 20 virtual tokens, for the encoder and the decoder
    assert counts["lora"] == result["trainable_parameters"]["lora"]
    assert re.search(r"^prompt_tuning +40,960 ", format_estimate(result), re.MULTILINE)


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].kbit])
def test_methods_that_claim_a_4bit_base_train_on_one(name):
    from peft_t5.modeling import load_base_model

    torch.manual_seed(0)
    method = get_method(name)
    model = add_adapter(load_base_model("tiny", qlora=True), method.build(method.settings({}), 100))
    tokenizer = tiny_tokenizer()
    batch = tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    labels = tokenizer(["To get away.", "Fish."], return_tensors="pt", padding=True).input_ids
    loss = model(**batch, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
