"""`estimate` reads only config.json and builds the model on the meta device."""
import subprocess
import sys
from pathlib import Path

import pytest

from peft_t5.estimate import estimate

FIXTURES = Path(__file__).parent / "fixtures"


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


def test_estimate_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "peft_t5", "estimate", "--model", str(FIXTURES / "flan-t5-large")],
                         capture_output=True, text=True, check=True).stdout
    assert "total parameters: 783,150,080" in out
    assert any(line.startswith("lora") and "4,718,592" in line for line in out.splitlines())


def test_estimate_qlora_prints_its_own_row():
    out = subprocess.run([sys.executable, "-m", "peft_t5", "estimate", "--model", str(FIXTURES / "flan-t5-large"),
                          "--qlora"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    rows = [line.split()[0] for line in out.stdout.splitlines()[3:]]
    assert rows == ["qlora"] and "4,718,592" in out.stdout


def test_estimate_of_a_folder_without_config_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peft_t5", "estimate", "--model", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"error: {tmp_path}: no config.json there")
    assert "Traceback" not in proc.stderr
