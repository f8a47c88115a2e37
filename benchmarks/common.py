"""Shared pieces of the benchmarks: data with the real SQuAD v2 length distribution, models from configs, memory."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def shared_folder() -> Path:
    """../shared beside this checkout, or beside the main checkout when this is a `git worktree` elsewhere."""
    import subprocess

    try:
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        common = ""
    beside_main = Path(common).parent.parent / "shared" if common else None
    return beside_main if beside_main and beside_main.exists() and not (ROOT.parent / "shared").exists() \
        else ROOT.parent / "shared"


SHARED = shared_folder()
REAL_SQUAD = Path(os.environ.get("SQUAD_V2_FILE", SHARED / "data" / "squad" / "squad-v2-dev-cs224n.json"))
REAL_JOKES = Path(os.environ.get("JOKES_FILE", SHARED / "data" / "jokes" / "qa-jokes.csv"))


def sample_instead(real: Path, variable: str, sample: str) -> str:
    """The bundled sample, said on stderr: its prompts are fewer and not the real ones' lengths."""
    print(f"benchmarks: no {real} (set {variable}): using the bundled sample {sample}; its figures are not the real "
          "data's", file=sys.stderr, flush=True)
    return sample
CONFIGS = Path(__file__).resolve().parent / "configs"


def squad_records(limit: int | None = None) -> tuple[list[dict], str]:
    """SQuAD v2 records (real dev questions when ../shared is there, else the bundled sample, said), shuffled once."""
    import random

    from peft_t5.tasks.squad import SAMPLE, read_squad_v2

    path = str(REAL_SQUAD) if REAL_SQUAD.exists() else sample_instead(REAL_SQUAD, "SQUAD_V2_FILE", SAMPLE)
    records = read_squad_v2(path)
    random.Random(0).shuffle(records)
    return records[:limit], path


def jokes_records() -> tuple[list[dict], str]:
    """The training split of the real reddit QA jokes when ../shared is there (31,761), else of the bundled sample."""
    from peft_t5.tasks.jokes import SAMPLE, load_splits

    path = str(REAL_JOKES) if REAL_JOKES.exists() else sample_instead(REAL_JOKES, "JOKES_FILE", SAMPLE)
    return load_splits(path, seed=42)["train"], path


def model_from_config(name: str, dtype=torch.float32, attn_implementation: str | None = None):
    """A T5 with random weights from benchmarks/configs/NAME.json: speed does not depend on the values."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    torch.manual_seed(0)
    with device():  # built and initialised where it trains: seconds, not minutes, for flan-t5-large on a GPU
        return AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn_implementation).to(dtype)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The switches that hold torch (and inductor's code, and peft-t5's kernels), oneDNN, MKL and CTranslate2 to fewer of
# the CPU's instructions: set to avx2 / AVX2, a CPU with AVX-512 runs as one without (benchmarks/README.md)
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "CT2_FORCE_CPU_ISA")


def machine() -> str:
    """The GPU, or the CPU's model and vector extensions (CTranslate2 and oneDNN pick their kernels by them)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    extensions = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                          ("AVX512-VNNI", "avx512_vnni"), ("AMX", "amx_tile")) if flag in flags]
    held = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    return (f"{model} ({', '.join(extensions) or 'no AVX2'}), {os.cpu_count()} CPU cores, torch {torch.__version__}"
            + (f"; instructions held by {', '.join(held)}" if held else ""))


def merged_ct2(folder: Path, base: str, adapter: str) -> dict[str, str]:
    """The adapter merged into its base (folder/merged, with the base's tokenizer) and converted to CTranslate2 in
    float32 and in int8 (folder/ct2_float32, folder/ct2_int8, each with its tokenizer.json): quantization -> folder."""
    import ctranslate2
    from peft import PeftModel

    from peft_t5.modeling import load_base_model, load_tokenizer

    merged = PeftModel.from_pretrained(load_base_model(base), adapter).merge_and_unload()
    merged.save_pretrained(folder / "merged")
    load_tokenizer(base).save_pretrained(folder / "merged")
    converted = {}
    for quantization in ("float32", "int8"):
        converted[quantization] = str(folder / f"ct2_{quantization}")
        ctranslate2.converters.TransformersConverter(str(folder / "merged"), copy_files=["tokenizer.json"]).convert(
            converted[quantization], quantization=quantization, force=True)
    return converted


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled process RSS growth on a CPU (bytes)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc, self.stop = psutil.Process(), False
            self.start = self.peak_rss = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()
            self.peak = self.peak_rss
        return False


def write_results(results: dict, output: str, chart: tuple[str, list[str], list[float], str] | None = None) -> None:
    """The JSON, and a bar chart PNG beside it: (title, labels, values, y label)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if chart:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        title, labels, values, ylabel = chart
        fig, ax = plt.subplots(figsize=(7, 4))
        bars = ax.bar(labels, values, color=["#999999", "#6699cc", "#cc6633", "#dd9955", "#88aa55"][: len(values)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
        plt.close(fig)
