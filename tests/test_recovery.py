"""Training runs that are interrupted, resumed or short: strategies that follow each other, resumes that skip
incomplete checkpoints and stop at --max_steps, a full disk in one line with the old adapter intact, throughput
recorded for a run shorter than one logging step, and no bitsandbytes chatter in runs that quantize nothing."""
import json
import logging
from pathlib import Path

import pytest
from test_reliability import FAST, adapter_weights, run_cli

from peft_t5.commands.train import train_main as train
from peft_t5.errors import PeftT5Error
from peft_t5.train_settings import parse_command_line as parse_train_args

STEPS = ["--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "8"]


def test_the_save_strategy_follows_the_evaluation_strategy_and_a_real_mismatch_is_one_line():
    *_, args = parse_train_args(["--task", "jokes", "--eval_strategy", "steps", "--eval_steps", "3"])
    assert (args.save_strategy, args.save_steps, args.load_best_model_at_end) == ("steps", 3, True)
    *_, args = parse_train_args(["--task", "jokes", "--save_strategy", "steps", "--save_steps", "4"])
    assert (args.eval_strategy, args.eval_steps) == ("steps", 4)
    *_, args = parse_train_args(["--task", "jokes"])
    assert (args.eval_strategy, args.save_strategy) == ("epoch", "epoch")
    with pytest.raises(PeftT5Error, match=r"^training arguments: --load_best_model_at_end requires the save and eval "
                                          r"strategy to match.*; see train_lora.py --help$"):
        parse_train_args(["--task", "jokes", "--eval_strategy", "steps", "--save_strategy", "epoch"])


def global_steps(folder: Path) -> dict[str, int]:
    return {p.name: json.loads((p / "trainer_state.json").read_text())["global_step"]
            for p in sorted(folder.glob("checkpoint-*"))}


@pytest.mark.slow
def test_resume_skips_incomplete_checkpoints_and_never_trains_past_max_steps(tmp_path, capsys):
    out = tmp_path / "jokes"
    argv = ["--task", "jokes", "--output_dir", str(out), *FAST, "--max_steps", "4", *STEPS]
    train(argv)
    meta = json.loads((out / "peft_t5.json").read_text())
    assert meta["throughput"]["tokens_per_s"] > 0 and meta["throughput"]["useful_tokens"] > 0  # 4 steps < logging 10
    checkpoints = out / "checkpoints"
    assert global_steps(checkpoints) == {"checkpoint-2": 2, "checkpoint-4": 4}
    (checkpoints / "checkpoint-6").mkdir()  # killed as the folder was created
    (checkpoints / "checkpoint-8").mkdir()
    (checkpoints / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # killed mid-write, or disk full
    capsys.readouterr()
    for _ in range(2):  # resuming a finished run trains nothing more
        train(argv + ["--resume"])
        assert global_steps(checkpoints) == {"checkpoint-2": 2, "checkpoint-4": 4}
    said = capsys.readouterr().out
    assert "--resume: checkpoint-8 is incomplete (no readable trainer_state.json; its save was interrupted): removed" in said
    assert "--resume: checkpoint-6 is incomplete" in said and f"resuming from {checkpoints / 'checkpoint-4'}" in said
    train([*argv[:-len(STEPS) - 2], "--max_steps", "6", *STEPS, "--resume"])  # a longer run continues to its end
    assert global_steps(checkpoints) == {"checkpoint-4": 4, "checkpoint-6": 6}

    (checkpoints / "checkpoint-9").mkdir()
    status, line = run_cli(train, argv + ["--resume_from_checkpoint", str(checkpoints / "checkpoint-9")], capsys)
    assert status == 2 and "checkpoint-9: no readable trainer_state.json; pass a whole checkpoint" in line


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_folder_and_the_old_adapter_stays_whole(tmp_path, capsys, monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    out = tmp_path / "jokes"
    argv = ["--task", "jokes", "--output_dir", str(out), *FAST]
    train(argv)
    before = adapter_weights(out)
    real_save = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):  # what safetensors raises on a full disk
        if "checkpoints" in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    status, line = run_cli(train, argv + ["--overwrite_output_dir"], capsys)
    assert status == 2, line
    assert line.startswith(f"error: {out}: no space left on the device (") and "MiB free); a checkpoint needs about" in line
    assert "pass --output_dir on another disk" in line
    after = adapter_weights(out)
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)
    assert not list(tmp_path.glob(".jokes.saving-*"))  # the half-written new adapter was removed


def test_bitsandbytes_optional_kernel_warning_is_kept_out_and_explained_once_where_4bit_is_used(capsys, caplog):
    from peft_t5.logs import setup_logging
    from peft_t5.modeling import check_bitsandbytes

    setup_logging()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("kernels._internals.hf_hub").warning(  # where the `kernels` package is installed, offline
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode.")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
            "install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        assert "kernels-community" not in caplog.text + capsys.readouterr().err
        check_bitsandbytes()
        check_bitsandbytes()
    assert caplog.text.count("bitsandbytes has no optional fast CPU kernel for 4-bit layers here") == 1
