"""--method full trains every weight through the same Trainer and saves a whole model that plain from_pretrained loads
to the model as trained, and that serves as a base for an adapter trained on it; --layers trains exactly the T5
blocks it names (counts derived from T5's shapes), for LoRA and for full, and a spec naming no block is refused."""
import json

import httpx
import pytest
import torch
from test_methods import QUESTIONS, generate_py
from test_reliability import FAST, QUICK, run_cli
from transformers import T5ForConditionalGeneration, TrainerCallback

import peft_t5
from peft_t5.bank import AdapterBank
from peft_t5.commands.train import train_main as train
from peft_t5.methods import get_method
from peft_t5.modeling import count_parameters, prepare_for_training, tiny_model, tiny_tokenizer
from peft_t5.serve.app import ServeSettings, create_app, running


class KeepLogits(TrainerCallback):
    """The trained model's logits on QUESTIONS as training ends, before anything is saved."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model)


def logits(model) -> torch.Tensor:
    batch = tiny_tokenizer()(QUESTIONS, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch, decoder_input_ids=torch.zeros_like(batch.input_ids[:, :4])).logits
    model.train(was_training)
    return out


@pytest.mark.slow
def test_full_trains_saves_a_whole_model_that_reloads_and_serves_as_a_base(tmp_path, capsys):
    keep = KeepLogits()
    full = tmp_path / "full"
    peft_t5.train(task="jokes", method="full", output_dir=str(full), **{**QUICK, "max_steps": 6}, eval_strategy="no",
                  load_best_model_at_end=False, callbacks=(keep,))
    meta = json.loads((full / "peft_t5.json").read_text())
    assert meta["method"] == "full" and meta["metrics"]["eval_loss"] < meta["eval_loss_before"] - 0.01
    assert meta["trainable_parameters"] == sum(p.numel() for p in tiny_model().parameters())
    assert (full / "model.safetensors").is_file() and not (full / "adapter_config.json").exists()
    reloaded = T5ForConditionalGeneration.from_pretrained(full)  # plain transformers, no peft-t5
    assert torch.equal(logits(reloaded), keep.logits)
    assert (logits(reloaded) - logits(tiny_model())).abs().max() > 1e-3  # it is not the base it started from

    lora = tmp_path / "lora"  # an adapter trained on the full fine-tune, which serves it as its base
    train(["--task", "jokes", "--output_dir", str(lora), *FAST, "--model", str(full), "--learning_rate", "0.01",
           "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    assert json.loads((lora / "peft_t5.json").read_text())["base_model"] == str(full)
    expected = generate_py(capsys, {"jokes": str(lora)}, "jokes")
    with running(create_app(AdapterBank.load(None, {"jokes": str(lora)}), ServeSettings(compile=False))) as url:
        reply = httpx.post(url + "/v1/generate", timeout=60, json={"adapter": "jokes", "inputs": QUESTIONS,
                                                                    "max_new_tokens": 8})
    assert [o["output"] or "(empty output)" for o in reply.json()["outputs"]] == expected


def block(config, decoder: bool, first: bool) -> int:
    """A T5 block's weights, from its shapes: attention q k v o (+ cross-attention in the decoder), the gated
    feed-forward wi_0 wi_1 wo, a layer norm before each, the relative position bias in block 0."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    attention = 4 * d * inner + d
    bias = config.relative_attention_num_buckets * config.num_heads if first else 0
    return attention * (2 if decoder else 1) + 3 * d * ff + d + bias


@pytest.mark.parametrize("method, layers, expected", [
    ("lora", "encoder:0", lambda c, r: 2 * r * (c.d_model + c.num_heads * c.d_kv)),  # q and v of one block
    ("lora", "decoder", lambda c, r: 2 * 4 * r * (c.d_model + c.num_heads * c.d_kv)),  # q v, self and cross, 2 blocks
    ("lora", "encoder:1,decoder:0", lambda c, r: 3 * 2 * r * (c.d_model + c.num_heads * c.d_kv)),
    ("full", "decoder:1", lambda c, r: block(c, decoder=True, first=False)),
    ("full", "encoder:0-1", lambda c, r: block(c, False, True) + block(c, False, False)),
    ("full", "encoder:0,decoder:0", lambda c, r: block(c, False, True) + block(c, True, True)),
])
def test_layers_train_exactly_the_blocks_named(method, layers, expected):
    model = tiny_model()
    chosen = get_method(method)
    settings = chosen.settings({"layers": layers})
    trained = prepare_for_training(model, chosen, settings, 0)
    assert count_parameters(trained)[0] == expected(model.config, settings.get("lora_r"))


@pytest.mark.slow
def test_layers_train_only_what_they_name_in_a_real_run_and_refusals_are_one_line(tmp_path, capsys):
    from peft_t5.cli import command

    status, err = run_cli(command("train"), ["--task", "jokes", *FAST, "--layers", "encoder:2-3", "--output_dir",
                                             str(tmp_path / "no")], capsys)
    assert status == 2 and err == ("error: --layers encoder:2-3: this model has no encoder block 2 (its encoder has "
                                   "blocks 0-1, its decoder 0-1); name blocks it has")
    status, err = run_cli(command("train"), ["--task", "jokes", *FAST, "--layers", "middle"], capsys)
    assert status == 2 and "'middle' is not a stack of blocks" in err
    status, err = run_cli(command("train"), ["--task", "jokes", *FAST, "--method", "full", "--qlora"], capsys)
    assert status == 2 and err.startswith("error: --qlora with --method full: a 4-bit base cannot train")
    status, err = run_cli(command("train"), ["--task", "jokes", *FAST, "--method", "prompt_tuning", "--layers",
                                             "decoder"], capsys)
    assert status == 2 and "--layers does not apply to --method prompt_tuning" in err
    assert not (tmp_path / "no").exists()

    out = tmp_path / "decoder1"  # full, decoder block 1 only: every other weight stays the base's, bit for bit
    train(["--task", "jokes", "--method", "full", "--layers", "decoder:1", "--output_dir", str(out), *FAST,
           "--learning_rate", "0.01", "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    before, after = tiny_model().state_dict(), T5ForConditionalGeneration.from_pretrained(out).state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("decoder.block.1.") for n in changed), sorted(changed)


@pytest.mark.slow
def test_a_whole_model_answers_alone_in_generate_evaluate_serve_and_export(tmp_path, capsys):
    from peft_t5.cli import command, run

    full = tmp_path / "full"
    peft_t5.train(task="jokes", method="full", output_dir=str(full), **QUICK, eval_strategy="no",
                  load_best_model_at_end=False)
    model = T5ForConditionalGeneration.from_pretrained(full).eval()
    tokenizer = tiny_tokenizer()
    with torch.no_grad():  # what the whole model says to the jokes prompt (the template recorded with it)
        ids = model.generate(**tokenizer(QUESTIONS, return_tensors="pt", padding=True), max_new_tokens=8)
    expected = [t.strip() or "(empty output)" for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    capsys.readouterr()
    assert run(command("generate"), ["--model", str(full), "--max_new_tokens", "8", *QUESTIONS]) == 0
    said = capsys.readouterr().out
    assert [line.removeprefix("base: ") for line in said.splitlines() if line.startswith("base: ")] == expected

    bank = AdapterBank.load(str(full), {})
    assert bank.names == ["base"] and bank.generate("base", QUESTIONS, max_new_tokens=8) == [
        "" if e == "(empty output)" else e for e in expected]
    with running(create_app(bank, ServeSettings(compile=False))) as url:
        reply = httpx.post(url + "/v1/completions", timeout=60, json={"model": "base", "prompt": QUESTIONS[0],
                                                                       "max_tokens": 8})
    assert reply.status_code == 200 and (reply.json()["choices"][0]["text"] or "(empty output)") == expected[0]

    status, _ = run_cli(command("evaluate"), ["--task", "jokes", "--model", str(full), "--predictions",
                                              str(tmp_path / "preds.json"), "--limit", "3"], capsys)
    assert status == 0 and len(json.loads((tmp_path / "preds.json").read_text())) == 3

    status, _ = run_cli(command("export"), ["--model", str(full), "--output_dir", str(tmp_path / "ct2")], capsys)
    assert status == 0 and (tmp_path / "ct2" / "model.bin").is_file()
    assert json.loads((tmp_path / "ct2" / "peft_t5.json").read_text())["method"] == "full"
