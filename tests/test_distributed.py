"""Training under `accelerate launch` with two CPU processes (gloo): the same adapter as one process.

Equal global batch and seed give equal adapters only without dropout: each process draws dropout masks
from its own RNG stream, so with dropout the runs agree in distribution, not in value. The tests set
--lora_dropout 0 (the tiny model's own dropout_rate is 0).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "train_lora.py")
COMMON = ["--task", "jokes", "--model", "tiny", "--max_steps", "8", "--lora_dropout", "0", "--learning_rate", "0.01",
          "--max_eval_samples", "8", "--generation_eval_samples", "4", "--sample_generations", "1",
          "--eval_strategy", "no", "--load_best_model_at_end", "false", "--eval_on_start", "false",
          "--logging_steps", "1", "--report_to", "none"]
CONFIGS = ROOT / "configs" / "accelerate"
TOLERANCE = 1e-5  # float32 sums in a different order; the weights themselves are ~0.2


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train(*args, processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a 2-core machine
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp-cpu.yaml"),
                 "--num_processes", str(processes), "--main_process_port", free_port()]
                if processes > 1 else [sys.executable])
    proc = subprocess.run(launcher + [SCRIPT, *COMMON, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains_and_resume_across_process_counts(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train("--output_dir", str(one), "--per_device_train_batch_size", "8", "--save_strategy", "no")
    proc = train("--output_dir", str(two), "--per_device_train_batch_size", "4", "--save_strategy", "steps",
                 "--save_steps", "4", processes=2)

    # one adapter, written and announced by the main process only
    assert proc.stdout.count("adapter saved to") == 1
    assert "find_unused_parameters" not in proc.stderr  # DDP's warning that it searched and found none
    assert proc.stdout.count("trainable params:") == 1
    assert proc.stdout.count("sample generations from the reloaded adapter") == 1
    meta = json.loads((two / "peft_t5.json").read_text())
    assert meta["processes"] == 2 and meta["training_args"]["per_device_train_batch_size"] == 4
    assert sorted(p.name for p in two.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert largest_difference(one, two) < TOLERANCE

    # a 2-process checkpoint resumed by one process (same global batch) ends where the 2-process run ended
    checkpoint = two / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "rng_state_1.pth").is_file()  # written by both processes
    train("--output_dir", str(resumed), "--per_device_train_batch_size", "8", "--save_strategy", "no",
          "--resume_from_checkpoint", str(checkpoint))
    assert largest_difference(two, resumed) < TOLERANCE


@pytest.mark.slow
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    # T5's own loss is a per-batch mean, and the Trainer sums it over accumulated batches: twice the gradient
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    train("--output_dir", str(whole), "--per_device_train_batch_size", "8", "--save_strategy", "no")
    train("--output_dir", str(accumulated), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
          "--save_strategy", "no")
    assert largest_difference(whole, accumulated) < TOLERANCE


@pytest.mark.slow
def test_token_budget_batches_on_two_processes_train_what_one_process_accumulating_two_trains(tmp_path):
    # process i takes batches i, i + 2, ... of one list; one process accumulates batches 2k and 2k + 1
    one, two = tmp_path / "one", tmp_path / "two"
    budget = ["--max_tokens_per_batch", "320", "--save_strategy", "no"]
    train("--output_dir", str(one), "--gradient_accumulation_steps", "2", *budget)
    proc = train("--output_dir", str(two), *budget, processes=2)
    assert "batches: up to 320 padded tokens each (--max_tokens_per_batch)" in proc.stdout
    assert json.loads((two / "peft_t5.json").read_text())["max_tokens_per_batch"] == 320
    assert largest_difference(one, two) < TOLERANCE


def test_accelerate_configs_name_what_they_set_up(tiny_model):
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(CONFIGS / f"{name}.yaml")) for name in
             ("ddp-cpu", "ddp", "fsdp", "zero2", "zero3")}
    assert {n: c.distributed_type.value for n, c in kinds.items()} == {
        "ddp-cpu": "MULTI_GPU", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert [kinds[n].deepspeed_config["zero_stage"] for n in ("zero2", "zero3")] == [2, 3]
    assert all(c.mixed_precision == "no" for c in kinds.values())  # bf16 comes from --bf16; fp16 breaks T5
    wrapped = kinds["fsdp"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert wrapped in {type(m).__name__ for m in tiny_model.modules()}


def test_sharded_launch_stores_4bit_weights_in_a_float_dtype_with_the_same_outputs(monkeypatch, tiny_model):
    import torch

    from peft_t5.modeling import quantize

    def four_bit(model):
        return {type(p).__name__: p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}

    plain = quantize(tiny_model)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    sharded = quantize(tiny_model)
    assert four_bit(plain) == {"Params4bit": torch.uint8} and four_bit(sharded) == {"Params4bit": torch.float32}
    ids, decoder_ids = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        a = plain(input_ids=ids, decoder_input_ids=decoder_ids).logits
        b = sharded(input_ids=ids, decoder_input_ids=decoder_ids).logits
    assert torch.equal(a, b)


def test_a_launch_that_started_one_process_says_so(monkeypatch, caplog):
    from peft_t5.training import warn_single_process_launch

    # what `accelerate launch --num_processes 2` (no --multi_gpu, no GPUs) leaves in the environment of its one process
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    warn_single_process_launch()
    assert "accelerate launch started one process" in caplog.text and "--multi_gpu" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    warn_single_process_launch()
    assert caplog.text == ""


@pytest.mark.slow
def test_an_fsdp2_sharded_adapter_is_gathered_and_saved_whole(tmp_path):
    """accelerate's FSDP needs GPUs; torch's FSDP2 shards on CPU processes too, so the save path train_lora.py
    takes under FSDP (gathered_state_dict, then save_adapter) is checked here with 2 processes over gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", free_port(), str(ROOT / "tests" / "fixtures" / "fsdp2_save.py"),
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, unsharded = load_file(tmp_path / "sharded" / "adapter_model.safetensors"), \
        load_file(tmp_path / "unsharded" / "adapter_model.safetensors")
    assert sharded.keys() == unsharded.keys() and len(sharded) > 0
    assert all(sharded[k].shape == unsharded[k].shape for k in sharded)  # whole tensors, not one process's shard
    assert largest_difference(tmp_path / "sharded", tmp_path / "unsharded") == 0.0
    import peft
    from packaging.version import Version

    if Version(peft.__version__) >= Version("0.22"):  # PEFT gathers the shards itself now: whole tensors too
        assert (tmp_path / "naive.txt").read_text() == "saved"
        assert largest_difference(tmp_path / "naive", tmp_path / "unsharded") == 0.0
    else:
        assert "Error" in (tmp_path / "naive.txt").read_text()  # saving without gathering fails under FSDP2
    from peft import PeftModel

    from peft_t5.modeling import tiny_model

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "sharded")  # plain PEFT, unsharded base
    b = next(p for n, p in loaded.named_parameters() if "lora_B" in n)
    assert b.abs().max() > 0.1  # the trained values, not a fresh (zero) init


def test_fsdp_on_a_cpu_and_adafactor_under_deepspeed_are_refused(monkeypatch):
    from peft_t5.errors import PeftT5Error
    from peft_t5.tasks import get_task
    from peft_t5.train_settings import parse_command_line as parse_train_args
    from peft_t5.train_settings import resolve_defaults

    model, data, lora, training = parse_train_args(["--task", "jokes", "--model", "tiny"])
    for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(variable, "true")
        if kind == "FSDP":
            with pytest.raises(PeftT5Error, match="asks for FSDP, which accelerate runs only on GPUs"):
                resolve_defaults(get_task("jokes"), model, data, training)
        else:  # DeepSpeed runs on CPU processes, but Adafactor there is not T5's Adafactor
            with pytest.raises(PeftT5Error, match="--optim adafactor under DeepSpeed: ZeRO hands the optimizer flat"):
                resolve_defaults(get_task("jokes"), model, data, training)
        monkeypatch.delenv(variable)


def test_zero3_on_two_cpu_processes_saves_whole_lora_tensors_equal_to_one_process(tmp_path):
    """DeepSpeed runs ZeRO-3 on CPU processes (gloo): the real sharded save path, end to end. Not in CI (the dev
    extras leave DeepSpeed out): a DeepSpeed CPU process aborted at start-up once in 4 runs of this file here."""
    pytest.importorskip("deepspeed")
    options = ["--optim", "adamw_torch", "--learning_rate", "0.001", "--save_strategy", "no", "--sample_generations", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero3.yaml"),
                "--main_process_port", free_port()]
    proc = subprocess.run(launcher + [SCRIPT, *COMMON, *options, "--output_dir", str(tmp_path / "zero3")],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(*options, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one"))
    assert largest_difference(tmp_path / "zero3", tmp_path / "one") < TOLERANCE
    from peft import PeftModel

    from peft_t5.modeling import tiny_model

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "zero3")  # plain PEFT, unsharded base
    shapes = {n: tuple(p.shape) for n, p in loaded.named_parameters() if "lora_" in n}
    assert shapes and all(0 not in s for s in shapes.values())  # whole tensors, not ZeRO-3's empty placeholders
