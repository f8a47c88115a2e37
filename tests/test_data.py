"""Tokenisation: truncation that keeps the question, labels padded with -100 that never count in the loss."""
import torch

from peft_t5.data import encode_source, seq2seq_collator, tokenize
from peft_t5.tasks import get_task


def test_truncation_keeps_the_question_whole(tokenizer, squad_record):
    task = get_task("squad")
    long_record = dict(squad_record, context=squad_record["context"] + " Filler text here." * 50)
    ids, truncated, answer_cut = encode_source(task, long_record, tokenizer, max_length=48)
    assert truncated and not answer_cut and len(ids) == 48 and ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(f"question: {squad_record['question']} context: The Normans")


def test_truncation_counts_answers_cut_away(tokenizer, squad_record):
    task = get_task("squad")
    filler = "Filler text here. " * 50
    late = dict(squad_record, context=filler + "It is in France.", answer_starts=[len(filler) + 9])
    short = dict(squad_record, context="Normandy is in France.", answer_starts=[15])
    unanswerable = dict(squad_record, context=filler, answers=[], answer_starts=[])
    dataset, stats = tokenize(task, [late, short, unanswerable], tokenizer, max_source_length=40)
    assert (stats.examples, stats.truncated, stats.answer_cut) == (3, 2, 1)
    assert max(dataset["length"]) == 40
    assert tokenizer.decode(dataset[2]["labels"], skip_special_tokens=True) == "unanswerable"


def test_labels_padded_with_minus_100_never_count(tokenizer, tiny_model, squad_record):
    task = get_task("squad")
    other = dict(squad_record, answers=["the 10th and 11th centuries"], answer_starts=[36])
    dataset, _ = tokenize(task, [squad_record, other], tokenizer)
    collator = seq2seq_collator(tokenizer, tiny_model)
    batch = collator([dataset[0], dataset[1]])
    n_short = len(dataset[0]["labels"])
    assert batch["labels"].shape[1] % 8 == 0
    assert (batch["labels"][0, n_short:] == -100).all() and (batch["labels"][0, :n_short] != -100).all()

    alone = collator([dataset[0]])  # the same example with less padding
    unpadded = {k: torch.tensor([dataset[0][k]]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss_alone = tiny_model(**alone).loss
        loss_unpadded = tiny_model(**unpadded).loss
        logits = tiny_model(**batch).logits
    assert torch.allclose(loss_alone, loss_unpadded, atol=1e-5)
    per_token = torch.nn.functional.cross_entropy(logits[0, :n_short], batch["labels"][0, :n_short])
    assert torch.allclose(per_token, loss_unpadded, atol=1e-5)
