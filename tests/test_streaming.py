"""--streaming: readers that never hold the whole file, and training from a stream with --max_steps."""
import csv
import gc
import json
import random
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from peft_t5.data import stream_splits, tokenize_stream
from peft_t5.errors import DataError
from peft_t5.tasks import get_task, jokes, squad

ROOT = Path(__file__).resolve().parent.parent


def test_streamed_jokes_are_the_jokes_the_eager_reader_keeps():
    eager = [r for r in jokes.read_jokes(jokes.SAMPLE) if jokes.is_qa_joke(r)]
    assert list(jokes.stream_jokes(jokes.SAMPLE)) == eager

    train, held_out = stream_splits(get_task("jokes"), jokes.SAMPLE, 20, seed=3, shuffle_buffer=50)
    streamed = list(train)
    assert held_out == eager[:20]
    assert sorted(r["question"] for r in streamed) == sorted(r["question"] for r in eager[20:])
    assert streamed != eager[20:]  # shuffled through the buffer

    train, held_out = stream_splits(get_task("jokes"), jokes.SAMPLE, 5, seed=3, shuffle_buffer=50,
                                    validation_data=jokes.SAMPLE)  # a separate validation file: nothing held out
    assert held_out == eager[:5] and len(list(train)) == len(eager)


def test_streamed_squad_lines_round_trip_to_the_nested_reader(tmp_path):
    records = squad.read_squad_v2(squad.SAMPLE)
    lines = tmp_path / "squad.jsonl"  # the flat layout of rajpurkar/squad_v2, one question per line
    lines.write_text("".join(json.dumps({
        "id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
        "answers": {"text": r["answers"], "answer_start": r["answer_starts"]}}) + "\n" for r in records))
    streamed = list(squad.stream_squad(str(lines)))
    assert streamed == records
    assert sum(not r["answers"] for r in streamed) == 150  # unanswerable questions stream too

    with pytest.raises(DataError, match=r"squad_v2_sample.json: --streaming reads SQuAD as JSON lines"):
        next(squad.stream_squad(squad.SAMPLE))


def test_stream_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('Question,Answer\nWhy?,Because.\n"Why not?,Never.\n')
    with pytest.raises(DataError, match=r"bad.csv: the record after line 2 is not valid CSV"):
        list(jokes.stream_jokes(str(bad)))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"question": "Why?", "answer": "Because."}\n{"question": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not JSON"):
        list(jokes.stream_jokes(str(lines)))
    with pytest.raises(DataError, match=r"missing.csv: no such file"):
        list(jokes.stream_jokes(str(tmp_path / "missing.csv")))


def write_jokes(path: Path, n: int) -> None:
    words = "the a cat dog road chicken bar walks into why what did say when how many does it take to bulb".split()
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Question", "Answer"])
        for i in range(n):
            writer.writerow([f"Joke {i}: {' '.join(rng.choices(words, k=25))}?", " ".join(rng.choices(words, k=20))])


@pytest.mark.slow
def test_streaming_100k_records_keeps_memory_flat(tmp_path, tokenizer):
    path = tmp_path / "jokes.csv"
    write_jokes(path, 100_000)  # ~21 MB of text
    task, process = get_task("jokes"), psutil.Process()
    mib = lambda: process.memory_info().rss / 2**20  # noqa: E731

    train, held_out = stream_splits(task, str(path), 100, seed=0, shuffle_buffer=1000)
    count, after_warmup, peak = 0, None, 0.0
    for count, example in enumerate(tokenize_stream(task, train, tokenizer, 64, 32), 1):
        if count == 10_000:
            after_warmup = mib()  # imports, arrow buffers and the shuffle buffer are in place by now
        if count % 5_000 == 0:
            peak = max(peak, mib())
    assert count == 100_000 - len(held_out) and set(example) == {"input_ids", "attention_mask", "labels"}
    streamed_growth = peak - after_warmup

    gc.collect()
    before = mib()
    records = jokes.read_jokes(str(path))  # the control: the eager reader holds every record
    eager_growth = mib() - before
    assert len(records) == 100_000
    # 90k more records (~19 MB of text) went through the stream; memory stayed within a few MB
    assert streamed_growth < 5, (streamed_growth, eager_growth)
    assert eager_growth > 8 * max(streamed_growth, 1)


@pytest.mark.slow
def test_train_from_a_stream_for_max_steps(tmp_path):
    data, out = tmp_path / "jokes.jsonl", tmp_path / "adapter"
    data.write_text("".join(json.dumps(r) + "\n" for r in jokes.read_jokes(jokes.SAMPLE)))
    train = [sys.executable, str(ROOT / "scripts" / "train_lora.py"), "--task", "jokes", "--model", "tiny",
             "--data", str(data), "--streaming", "--output_dir", str(out), "--max_eval_samples", "8",
             "--generation_eval_samples", "4", "--sample_generations", "1", "--report_to", "none"]
    refused = subprocess.run(train, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --streaming needs --max_steps: a stream has no length to count epochs in")

    proc = subprocess.run(train + ["--max_steps", "5"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "streaming training records from" in proc.stdout and "the first 8 of them are the validation set" in proc.stdout
    meta = json.loads((out / "peft_t5.json").read_text())
    assert meta["streaming"] is True and meta["train_records"] is None
    state = json.loads((out / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [0, 1, 2, 3, 4, 5]  # every 20% of 5 steps
