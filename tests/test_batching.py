"""Issue 11: batches by tokens, the grouped Adafactor, and the NaN guard that reads the device only when it must."""
import copy

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from peft_t5.arguments import TrainingArguments
from peft_t5.batching import TokenBudgetBatchSampler, batch_cost
from peft_t5.data import seq2seq_collator, tokenize
from peft_t5.errors import PeftT5Error
from peft_t5.modeling import add_lora, tiny_model
from peft_t5.optimizer import GroupedAdafactor
from peft_t5.tasks import get_task, jokes, squad
from peft_t5.trainer import build_trainer


@pytest.fixture(scope="module")
def datasets_(tokenizer):
    joke_records = jokes.load_splits(jokes.SAMPLE)["train"]
    squad_records = squad.read_squad_v2(squad.SAMPLE)[:120]
    return {"jokes": tokenize(get_task("jokes"), joke_records, tokenizer)[0],
            "squad": tokenize(get_task("squad"), squad_records, tokenizer, max_source_length=256)[0]}


def lengths(dataset):
    return list(dataset["length"]), [len(ids) for ids in dataset["labels"]]


@pytest.mark.parametrize("name,budget", [("jokes", 256), ("jokes", 2048), ("squad", 1024), ("squad", 4096)])
def test_batches_stay_within_the_budget_after_padding_and_cover_every_example_once(datasets_, tokenizer, name, budget):
    dataset = datasets_[name]
    sampler = TokenBudgetBatchSampler(*lengths(dataset), budget, seed=3)
    collate = seq2seq_collator(tokenizer)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
        for batch in batches:  # the budget holds for what the collator really builds
            collated = collate([{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in batch])
            assert collated["input_ids"].numel() + collated["labels"].numel() <= budget
    sizes = [len(b) for b in batches]
    assert max(sizes) > 2 * min(sizes) or name == "squad"  # short examples get bigger batches
    assert sum(sampler.padded_tokens()) / len(sampler) > 0.6 * budget  # batches are packed, not half empty


def test_a_batch_holds_hundreds_of_short_examples_and_few_long_ones():
    short = sorted(len(b) for b in TokenBudgetBatchSampler([12] * 2000, [6] * 2000, 8192))
    assert short == [2000 - 5 * 341] + [341] * 5  # 8192 // (16 + 8) = 341, the rest in one batch
    long = sorted(len(b) for b in TokenBudgetBatchSampler([500] * 40, [20] * 40, 8192))
    assert long == [40 - 2 * 15] + [15] * 2  # 8192 // (504 + 24) = 15


def test_same_seed_same_batches_new_epoch_new_order_same_shapes(datasets_):
    args = lengths(datasets_["jokes"])
    a, b, other = (TokenBudgetBatchSampler(*args, 512, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b)
    assert list(a) != list(other)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    cost = lambda batch: batch_cost([args[0][i] for i in batch], [args[1][i] for i in batch])
    assert sorted(map(cost, first)) == sorted(map(cost, second))  # same padded shapes, so same count and cost
    padded_source = lambda i: -(-args[0][i] // 8) * 8
    assert max(map(padded_source, first[0])) == max(map(padded_source, range(len(args[0]))))  # longest first: OOM at step 1


def test_two_processes_split_the_batches_evenly_and_together_cover_the_epoch_once(datasets_):
    sampler = TokenBudgetBatchSampler(*lengths(datasets_["jokes"]), 300, seed=0, count_multiple_of=2)
    assert len(sampler) % 2 == 0
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(sampler) // 2
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(len(datasets_["jokes"])))
    assert shards == [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]


def test_an_example_larger_than_the_budget_is_refused_by_name():
    with pytest.raises(PeftT5Error, match=r"--max_tokens_per_batch 64: example 1 alone takes 88 tokens after padding"):
        TokenBudgetBatchSampler([10, 70, 5], [3, 9, 2], 64)


def run_args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path / "run"), eval_strategy="no", eval_on_start=False,
                             load_best_model_at_end=False, report_to="none", dataloader_pin_memory=False,
                             disable_tqdm=True, seed=0, save_strategy="no", **kwargs)


@pytest.mark.slow
def test_training_on_token_batches_equals_the_same_batches_fed_by_hand(datasets_, tokenizer, tmp_path):
    dataset, budget = datasets_["jokes"].select(range(96)), 400
    torch.manual_seed(0)
    start = add_lora(tiny_model(), dropout=0.0, target_modules=["all-linear"])
    by_trainer, by_hand = copy.deepcopy(start), copy.deepcopy(start)

    args = run_args(tmp_path, num_train_epochs=1, learning_rate=1e-2, logging_steps=1)
    trainer = build_trainer(by_trainer, tokenizer, get_task("jokes"), dataset, None, args, [], 64, 32,
                            max_tokens_per_batch=budget)
    trainer.train()

    sampler = TokenBudgetBatchSampler(*lengths(dataset), budget, seed=0)
    sampler.set_epoch(0)
    collate, params = seq2seq_collator(tokenizer), [p for p in by_hand.parameters() if p.requires_grad]
    optimizer = GroupedAdafactor(params, lr=1e-2)
    by_hand.train()
    steps = 0
    for batch in sampler:
        inputs = collate([{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in batch])
        logits = by_hand(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(), reduction="sum")
        (loss / inputs["labels"].ne(-100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    assert trainer.state.global_step == steps == len(sampler) > 3
    trained = dict(by_trainer.named_parameters())
    largest = max((trained[n] - p).abs().max().item() for n, p in by_hand.named_parameters() if p.requires_grad)
    moved = max((trained[n] - p).abs().max().item() for n, p in start.named_parameters() if p.requires_grad)
    assert largest < 1e-5 < moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_adafactor_steps_like_transformers_adafactor(dtype):
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    shapes = [(16, 128), (128, 16)] * 6 + [(16, 64), (7,), (7,), (3, 5, 4)]
    ours = [torch.nn.Parameter(torch.randn(s).mul(0.1).to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    initial = [p.detach().clone() for p in ours]
    reference = Adafactor(theirs, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False,
                          weight_decay=0.01)
    grouped = GroupedAdafactor(ours, lr=1e-3, weight_decay=0.01)
    for step in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape).mul(step + 1).to(dtype)
            b.grad = a.grad.clone()
        grouped.step()
        reference.step()
        tolerance = 1e-6 if dtype == torch.float32 else 2 ** -7  # bf16: one rounding of the weight
        assert max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs)) <= tolerance
    assert set(grouped.state[ours[0]]) >= {"step", "exp_avg_sq_row", "exp_avg_sq_col"}  # transformers' state names
    assert min((a.float() - b.float()).abs().max().item() for a, b in zip(ours, initial)) > 1e-3


def test_the_toolkit_picks_grouped_adafactor_and_leaves_other_optimizers_alone(datasets_, tokenizer, tmp_path):
    task, data = get_task("jokes"), datasets_["jokes"].select(range(8))
    trainer = build_trainer(add_lora(tiny_model()), tokenizer, task, data, None, run_args(tmp_path, max_steps=1), [], 64, 32)
    trainer.create_optimizer()
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) is GroupedAdafactor
    args = run_args(tmp_path, max_steps=1, optim="adamw_torch")
    trainer = build_trainer(add_lora(tiny_model()), tokenizer, task, data, None, args, [], 64, 32)
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)


def test_nan_guard_reads_the_device_at_the_next_save_and_names_the_first_bad_step(datasets_, tokenizer, tmp_path):
    from transformers import TrainerCallback

    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                next(p for n, p in model.named_parameters() if "lora_A" in n).data.fill_(float("nan"))

    args = run_args(tmp_path, max_steps=12, per_device_train_batch_size=4, logging_steps=100)
    args.save_strategy, args.save_steps = "steps", 5
    trainer = build_trainer(add_lora(tiny_model()), tokenizer, get_task("jokes"), datasets_["jokes"].select(range(48)),
                            None, args, [], 64, 32)
    trainer.add_callback(PoisonAtStep3())
    with pytest.raises(PeftT5Error, match=r"adapter weights became NaN or infinite\) at step 3;"):
        trainer.train()
    assert trainer.state.global_step == 5  # found at the first step that saves, not at every step
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # and before that save
