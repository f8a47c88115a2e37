"""`estimate` reads only config.json and builds the model on the meta device."""
from pathlib import Path

import pytest

from peft_t5.cli import command, run
from peft_t5.estimate import estimate

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.slow
def test_flan_t5_large_counts_match_peft_and_the_real_checkpoint():
    e = estimate(str(FIXTURES / "flan-t5-large"))
    assert e["trainable_parameters"]["lora"] == 4_718_592  # rank 16 on q and v: 72 attentions * 2 * 16 * (1024 + 1024)
    assert e["total_parameters"] == 783_150_080  # flan-t5-large has its own lm_head (untied)
    assert e["full"]["weights_gib"] == pytest.approx(783_150_080 * 4 / 1024**3)
    assert e["qlora"]["weights_gib"] < e["lora"]["weights_gib"] / 4


def test_t5_small_from_a_config_file_path():
    e = estimate(str(FIXTURES / "t5-small" / "config.json"))
    assert e["total_parameters"] == 60_506_624  # t5-small, embeddings tied
    assert e["trainable_parameters"]["lora"] == 589_824  # 6 + 6*2 attentions * 2 * 16 * (512 + 512)


@pytest.mark.slow
def test_estimate_command_prints_the_table(capsys):
    assert run(command("estimate"), ["--model", str(FIXTURES / "flan-t5-large")]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 783,150,080" in out
    assert any(line.startswith("lora") and "4,718,592" in line for line in out.splitlines())


@pytest.mark.slow
def test_estimate_qlora_prints_its_own_row(capsys):
    assert run(command("estimate"), ["--model", str(FIXTURES / "flan-t5-large"), "--qlora"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["qlora"] and "4,718,592" in out


def test_estimate_of_a_folder_without_config_is_one_line(tmp_path, capsys):
    assert run(command("estimate"), ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: no config.json there")


def test_estimate_takes_method_and_refuses_its_layers_as_train_does(capsys):
    from test_reliability import run_cli

    from peft_t5.cli import command

    status, err = run_cli(command("estimate"), ["--model", "tiny", "--method", "prompt_tuning", "--layers",
                                                 "decoder:1"], capsys)
    assert status == 2 and err == ("error: --layers does not apply to --method prompt_tuning (it takes "
                                   "--num_virtual_tokens); leave it out")
    status, err = run_cli(command("estimate"), ["--model", "tiny", "--method", "fulll"], capsys)
    assert status == 2 and "did you mean full?" in err
    from peft_t5.estimate import estimate

    assert list(estimate("tiny", method="ia3", layers="decoder:1")["methods"]) == ["ia3"]
    assert estimate("tiny", method="ia3", layers="decoder:1")["methods"]["ia3"]["trainable_parameters"] < \
        estimate("tiny", method="ia3")["methods"]["ia3"]["trainable_parameters"]


def test_an_extractive_task_counts_the_span_head_and_leaves_out_what_it_cannot_train_with():
    lm = estimate(str(FIXTURES / "t5-small" / "config.json"))
    span = estimate(str(FIXTURES / "t5-small" / "config.json"), task="squad_extractive")
    head = 2 * 512 + 2  # qa_outputs: start and end logits from d_model
    assert (span["head"], lm["head"]) == ("span", "lm")
    assert span["total_parameters"] == lm["total_parameters"] + head  # t5-small's lm_head is the tied embedding
    assert span["trainable_parameters"]["lora"] == lm["trainable_parameters"]["lora"] + head  # modules_to_save
    assert "prompt_tuning" in lm["methods"] and "prompt_tuning" not in span["methods"]
    from peft_t5.errors import PeftT5Error

    with pytest.raises(PeftT5Error, match="--method prompt_tuning with --task squad_extractive"):
        estimate(str(FIXTURES / "t5-small" / "config.json"), task="squad_extractive", method="prompt_tuning")
