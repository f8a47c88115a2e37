"""peft-t5 export: the checked merge, CTranslate2's converter, and CTranslate2's greedy output equal to the merged
model's; the folder alone (model + tokenizer) translates a new input as the merged model generates it."""
import json

import ctranslate2
import pytest
import torch
from test_engine import spread_weights
from transformers import AutoTokenizer

from peft_t5.adapters import save_adapter
from peft_t5.cli import main
from peft_t5.errors import PeftT5Error
from peft_t5.exporting import export as export_ctranslate2
from peft_t5.modeling import add_lora, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An adapter on a saved base whose weights are spread wide enough that greedy decoding wanders over the
    vocabulary (the tiny T5's random weights repeat one token, which every converter would get right)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    base = spread_weights(tiny_model(), 0.1)
    base.save_pretrained(folder / "base")
    tiny_tokenizer().save_pretrained(folder / "base")
    model = add_lora(base, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_adapter(model, tiny_tokenizer(), folder / "jokes",
                 {"task": "jokes", "base_model": str(folder / "base"), "template": "{question}"}, "test adapter")
    return folder / "jokes", model


def test_the_exported_folder_translates_as_the_merged_model_generates(adapter, tmp_path, capsys):
    path, model = adapter
    assert main(["export", "--adapter", str(path), "--output_dir", str(tmp_path / "ct2")]) == 0
    printed = capsys.readouterr().out
    assert "CTranslate2 float32 greedy output equals the merged model's on 4 of 4 probes" in printed
    assert json.loads((tmp_path / "ct2" / "peft_t5.json").read_text())["format"] == "ctranslate2"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ct2")  # the folder alone tokenizes
    source = "How do cows stay up to date with the news?"
    with torch.inference_mode():
        expected = model.merge_and_unload().generate(**tokenizer([source], return_tensors="pt"), max_new_tokens=20)[0, 1:].tolist()
    expected = [t for t in expected if t not in (0, 1)]
    result = ctranslate2.Translator(str(tmp_path / "ct2")).translate_batch(
        [tokenizer.convert_ids_to_tokens(tokenizer(source).input_ids)], beam_size=1, max_decoding_length=20)
    assert tokenizer.convert_tokens_to_ids(result[0].hypotheses[0]) == expected and len(set(expected)) > 5


def test_int8_export_reports_how_many_probes_kept_their_output(adapter, tmp_path):
    report = export_ctranslate2(str(adapter[0]), str(tmp_path / "int8"), quantization="int8")
    assert report.equal == report.probes == 4 and 0 <= report.quantized_equal <= 4
    assert (tmp_path / "int8" / "model.bin").stat().st_size < 0.5 * sum(
        p.numel() * 4 for p in tiny_model().parameters())  # int8 weights: well under float32's size


def test_export_refuses_before_loading_anything(adapter, tmp_path):
    path = adapter[0]
    with pytest.raises(PeftT5Error, match="lies inside the adapter folder .*the CTranslate2 model would replace"):
        export_ctranslate2(str(path), str(path / "ct2"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(PeftT5Error, match="already exists and is not empty; pass another --output_dir, or --overwrite_output_dir"):
        export_ctranslate2(str(path), str(tmp_path / "used"))
    with pytest.raises(PeftT5Error, match="--quantization float16: .*float16 overflows in T5"):
        export_ctranslate2(str(path), str(tmp_path / "x"), quantization="float16")


def test_the_readmes_translate_batch_answers_as_generate_py_does(adapter, tmp_path, capsys, monkeypatch):
    """The README's CTranslate2 snippet, run as written on an export, against generate.py's output."""
    import re
    from pathlib import Path

    from peft_t5.cli import command, run

    path, _ = adapter
    assert main(["export", "--adapter", str(path), "--output_dir", str(tmp_path / "exported" / "jokes")]) == 0
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r"```python\n(import json, ctranslate2\n.*?)```", readme, re.S)[1]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    capsys.readouterr()
    assert run(command("generate"), ["--adapter", f"jokes={path}", "--max_new_tokens", "64", *scope["questions"]]) == 0
    said = [line.removeprefix("jokes: ") for line in capsys.readouterr().out.splitlines() if line.startswith("jokes: ")]
    assert scope["answers"] == said and len(said[0]) > 10
