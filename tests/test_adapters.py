"""QLoRA, merging, and switching adapters on one loaded base (issue 3), on the tiny model."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, T5ForConditionalGeneration

from peft_t5 import merging
from peft_t5.bank import AdapterBank
from peft_t5.commands.train import train_main as train
from peft_t5.errors import PeftT5Error
from peft_t5.merging import merge as merge_adapter
from peft_t5.merging import probe_logits
from peft_t5.modeling import add_lora, load_base_model, tiny_model

QUESTIONS = ["Why did the scarecrow win an award?", "What do you call a fish with no eyes?"]
SQUAD = [("Where is Normandy?", "Normandy is a region in France."),
         ("Who wrote Hamlet?", "Hamlet is a play by William Shakespeare.")]


def train_adapter(out, task, *extra):
    train(["--task", task, "--model", "tiny", "--output_dir", str(out), "--max_steps", "30", "--learning_rate", "0.01",
           "--target_modules", "all-linear", "--max_source_length", "128", "--report_to", "none",
           "--sample_generations", "0", "--generation_eval_samples", "4", "--max_eval_samples", "8",
           "--disable_tqdm", "true", *extra])
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"jokes": train_adapter(root / "jokes", "jokes"), "squad": train_adapter(root / "squad", "squad"),
            "qlora": train_adapter(root / "qlora", "jokes", "--qlora")}


def logits(model, tokenizer, sources, **kwargs):
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    decoder_input_ids = torch.zeros((len(sources), 4), dtype=torch.long)
    with torch.no_grad():
        return model(**batch, decoder_input_ids=decoder_input_ids, **kwargs).logits


@pytest.mark.slow
def test_qlora_steps_lower_the_loss_and_keep_the_4bit_base(tokenizer, tmp_path):
    from test_training import train_few_steps

    model = add_lora(load_base_model("tiny", qlora=True), target_modules=["all-linear"])
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) > 0  # the linear layers really are 4-bit
    losses = train_few_steps(model, tokenizer, tmp_path, steps=30)
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)


@pytest.mark.slow
def test_qlora_adapter_has_the_lora_format_and_loads_onto_a_full_precision_base(adapters):
    bank = AdapterBank.load("tiny", {"jokes": adapters["qlora"]})
    assert bank.metadata["jokes"]["qlora"] is True
    full = PeftModel.from_pretrained(tiny_model(), adapters["qlora"])
    assert any("lora_A" in n for n, _ in full.named_parameters())


@pytest.mark.slow  # on the adapters this module trains once
def test_lora_merge_equals_unmerged_and_loads_without_peft(adapters, tmp_path):
    report = merge_adapter(str(adapters["jokes"]), str(tmp_path / "merged"))
    assert report.merge_into == "original" and report.max_logit_diff < 1e-4
    merged = T5ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    unmerged = PeftModel.from_pretrained(tiny_model(), adapters["jokes"]).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert torch.allclose(probe_logits(merged, tok), probe_logits(unmerged, tok), atol=1e-4)
    assert not torch.allclose(probe_logits(merged, tok), probe_logits(tiny_model(), tok), atol=1e-2)


@pytest.mark.slow  # on the adapters this module trains once
def test_qlora_merge_into_dequantized_base_reproduces_the_trained_model(adapters, tmp_path):
    dequantized = merge_adapter(str(adapters["qlora"]), str(tmp_path / "deq"))
    original = merge_adapter(str(adapters["qlora"]), str(tmp_path / "orig"), merge_into="original")
    assert dequantized.merge_into == "dequantized" and dequantized.max_logit_diff < 1e-4
    assert original.tolerance is None
    assert original.max_logit_diff > 100 * dequantized.max_logit_diff


@pytest.mark.slow  # on the adapters this module trains once
def test_failed_merge_check_writes_nothing(adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(merging, "LORA_TOLERANCE", 0.0)
    out = tmp_path / "merged"
    with pytest.raises(PeftT5Error, match="nothing was written"):
        merge_adapter(str(adapters["jokes"]), str(out))
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(PeftT5Error, match="--merge_into dequantized is for QLoRA adapters"):
        merge_adapter(str(adapters["jokes"]), str(out), merge_into="dequantized")


@pytest.mark.slow  # on the adapters this module trains once
def test_each_adapter_in_the_bank_equals_a_model_with_only_that_adapter(adapters):
    bank = AdapterBank.load(None, {"jokes": adapters["jokes"], "squad": adapters["squad"]})
    sources = bank.sources("jokes", QUESTIONS)
    per_adapter = {}
    for name in ("jokes", "squad"):
        per_adapter[name] = logits(bank.model_for(name), bank.tokenizer, sources)
        alone = PeftModel.from_pretrained(tiny_model(), adapters[name]).eval()
        assert torch.allclose(per_adapter[name], logits(alone, bank.tokenizer, sources), atol=1e-6)
    assert not torch.allclose(per_adapter["jokes"], per_adapter["squad"], atol=1e-3)
    with bank.model.disable_adapter():
        base = logits(bank.model, bank.tokenizer, sources)
    assert torch.allclose(base, logits(tiny_model(), bank.tokenizer, sources), atol=1e-6)
    assert bank.generate("base", QUESTIONS, prompt_of="jokes") == [
        t.strip() for t in bank.tokenizer.batch_decode(
            tiny_model().generate(**bank.tokenizer(QUESTIONS, return_tensors="pt", padding=True), max_new_tokens=64),
            skip_special_tokens=True)]


@pytest.mark.slow  # on the adapters this module trains once
def test_a_mixed_batch_equals_the_per_task_runs(adapters):
    bank = AdapterBank.load(None, {"jokes": adapters["jokes"], "squad": adapters["squad"]})
    items = [("jokes", QUESTIONS[0]), ("squad", SQUAD[0]), ("base", QUESTIONS[1]), ("squad", SQUAD[1])]
    sources = [bank.sources(n, [x])[0] for n, x in items]
    names = [bank.peft_name(n) for n, _ in items]
    mixed = logits(bank.model, bank.tokenizer, sources, adapter_names=names)
    for i, (name, _) in enumerate(items):
        if name == "base":
            with bank.model.disable_adapter():
                alone = logits(bank.model, bank.tokenizer, sources)
        else:
            alone = logits(bank.model_for(name), bank.tokenizer, sources)
        assert torch.allclose(mixed[i], alone[i], atol=1e-5), name
    separately = [bank.generate(n, [x], raw=True)[0] for n, x in items]
    assert bank.generate_mixed(items, raw=True) == separately
    assert bank.sources("squad", SQUAD[:1]) == ["question: Where is Normandy? context: Normandy is a region in France."]


@pytest.mark.slow  # on the adapters this module trains once
def test_a_mismatched_base_is_refused_naming_both(adapters, tmp_path):
    from transformers import T5Config

    other = T5ForConditionalGeneration(T5Config(vocab_size=2048, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(PeftT5Error, match=r"adapter trained on base 'tiny' does not fit base '.*other'.*expects 128 features, base has 64"):
        AdapterBank.load(str(tmp_path / "other"), {"jokes": adapters["jokes"]})
    tiny_model().save_pretrained(tmp_path / "tiny-copy")  # same shapes: a local copy of the base is accepted
    bank = AdapterBank.load(str(tmp_path / "tiny-copy"), {"jokes": adapters["jokes"]})
    assert bank.names == ["base", "jokes"]
