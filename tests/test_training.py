"""The training path itself: loss falls, the base stays untouched, the saved adapter reloads with plain PEFT."""
import json

import pytest
import torch
from peft import PeftModel

from peft_t5.adapters import read_metadata, save_adapter
from peft_t5.arguments import TrainingArguments
from peft_t5.data import tokenize
from peft_t5.modeling import add_lora, count_parameters, tiny_model
from peft_t5.tasks import get_task
from peft_t5.tasks.jokes import SAMPLE, load_splits
from peft_t5.trainer import build_trainer


def train_few_steps(model, tokenizer, tmp_path, steps=40):
    task = get_task("jokes")
    records = load_splits(SAMPLE)["train"][:8]
    dataset, _ = tokenize(task, records, tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no",
                             eval_on_start=False, load_best_model_at_end=False, report_to="none",
                             dataloader_pin_memory=False, disable_tqdm=True, seed=0)
    trainer = build_trainer(model, tokenizer, task, dataset, None, args, [], 64, 32)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.slow
def test_steps_on_a_fixed_batch_lower_the_loss_and_leave_the_base_bit_identical(tokenizer, tmp_path):
    model = add_lora(tiny_model(), target_modules=["all-linear"])
    before = base_state(model)
    losses = train_few_steps(model, tokenizer, tmp_path)
    assert len(losses) == 40
    assert losses[-1] < 0.5 * losses[0], losses
    after = base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora)  # the adapter, and only it, moved


def test_default_lora_targets_q_and_v_with_the_defaults():
    model = add_lora(tiny_model())
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.target_modules)) == (16, 32, 0.05, ["q", "v"])
    trainable, total = count_parameters(model)
    # tiny: d_model 128, q and v map 128 -> 4 heads * 32; 2 encoder self + 2 decoder (self + cross) attentions
    assert trainable == 16 * (128 + 128) * 2 * (2 + 2 * 2)
    assert total == sum(p.numel() for p in tiny_model().parameters()) + trainable


def test_saved_adapter_reloads_with_plain_peft_and_same_logits(tokenizer, tmp_path):
    model = add_lora(tiny_model())
    train_few_steps(model, tokenizer, tmp_path, steps=5)
    model.eval()
    batch = tokenizer(["Why did the bike fall over?", "What do you call a sad hat?"], return_tensors="pt", padding=True)
    decoder_input_ids = torch.zeros((2, 3), dtype=torch.long)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=decoder_input_ids).logits
    out = tmp_path / "adapter"
    save_adapter(model, tokenizer, out, {"task": "jokes", "base_model": "tiny"}, "# card\n")
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert read_metadata(out)["task"] == "jokes"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    reloaded = PeftModel.from_pretrained(tiny_model(), out).eval()
    with torch.no_grad():
        got = reloaded(**batch, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(got, expected)
    with reloaded.disable_adapter(), torch.no_grad():
        base = reloaded(**batch, decoder_input_ids=decoder_input_ids).logits
    assert not torch.allclose(base, expected)


def test_target_modules_that_match_nothing_list_the_real_names():
    from peft_t5.errors import PeftT5Error

    with pytest.raises(PeftT5Error, match=r"--target_modules query match no layer.*named: .*\bq\b.*\bv\b"):
        add_lora(tiny_model(), target_modules=["query"])
    with pytest.raises(PeftT5Error, match="--lora_r 0"):
        add_lora(tiny_model(), r=0)
    with pytest.raises(PeftT5Error, match=r"--lora_dropout 1.0: must be in \[0, 1\)"):
        add_lora(tiny_model(), dropout=1.0)
