"""Load a T5 base (Hub id, local folder, or the built-in `tiny`), optionally in 4-bit, and wrap it with LoRA.

Knows no task. `tiny` is a small T5 built from the config shipped in peft_t5/tiny/, with a sentencepiece
tokenizer trained on the text of the bundled samples: it needs no network and trains in seconds, which
makes it the offline demo and the test model. Its weights are random (seeded), so it is a smoke test only.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import PeftT5Error
from .hub import TINY, model_problem
from .logs import explain_4bit_kernels
from .methods import get_method, layer_blocks

TINY_DIR = Path(__file__).resolve().parent / "tiny"
DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a T5 tokenizer: the fast one's JSON or sentencepiece's model


def bf16_supported() -> bool:
    """bf16 that runs fast here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX matrix units."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from .kernels import cpu_lacks

    return cpu_lacks("AVX512-BF16") is None or cpu_lacks("AMX") is None


def _sample_texts() -> list[str]:
    """Every string in the bundled sample files, whatever their layout (modeling knows no task)."""
    import csv

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    texts: list[str] = []
    for path in sorted(DATA_DIR.iterdir()):
        if path.suffix == ".json":
            texts += [s for s in strings(json.loads(path.read_text(encoding="utf-8"))) if len(s) > 3]
        elif path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                texts += [cell for row in csv.reader(f) for cell in row]
    return texts


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A T5 (unigram sentencepiece) tokenizer trained on the bundled samples; deterministic."""
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(_tiny_sentencepiece())
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0)


@functools.lru_cache(maxsize=1)
def _tiny_sentencepiece() -> bytes:
    """The tiny tokenizer's sentencepiece model, trained once a process (0.5 s; loading it takes 20 ms)."""
    import sentencepiece as spm

    vocab_size = json.loads((TINY_DIR / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sample_texts()), model_prefix=f"{tmp}/spiece", vocab_size=vocab_size,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
            character_coverage=1.0, minloglevel=2,
        )
        return (Path(tmp) / "spiece.model").read_bytes()


def tiny_config():
    return AutoConfig.from_pretrained(TINY_DIR)


def tiny_model(span_head: bool = False) -> PreTrainedModel:
    """The tiny T5 with weights initialised from its config under a fixed seed: the same on every call. span_head:
    T5ForQuestionAnswering (a start/end head on the decoder, for extractive QA) instead of the language model, over
    the same base weights (the two classes draw their embeddings differently from one seed, and an extractive
    adapter is served on the language model's)."""
    from transformers import T5ForConditionalGeneration, T5ForQuestionAnswering

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = T5ForConditionalGeneration(tiny_config()).eval()
        if not span_head:
            return model
        torch.manual_seed(TINY_SEED)
        qa = T5ForQuestionAnswering(tiny_config()).eval()
    qa.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    return qa


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == TINY:
        return tiny_tokenizer()
    problem = model_problem(name)
    if problem:
        raise PeftT5Error(problem)
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty T5 tokenizer here, mapping every word to <unk>, without a word
        raise PeftT5Error(f"{name}: cannot load its tokenizer (no {' or '.join(TOKENIZER_FILES)} in the folder); "
                          "copy the tokenizer files of the model you started from into it")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # no tokenizer files, the Hub unreachable, a gated or missing repo
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PeftT5Error(f"{name}: cannot load its tokenizer ({first}); pass a local model folder, a Hub id you "
                          "can reach, or tiny")


def base_is_sharded() -> bool:
    """Launched by accelerate with FSDP or DeepSpeed ZeRO-3, which split the base's weights across processes."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def quantization_config(span_head: bool = False):
    """4-bit NF4 with double quantization; compute in bf16 where the hardware has it, else float32. span_head: the
    span head stays in full precision (it is new and trains, saved beside the adapter).

    FSDP and ZeRO-3 shard only floating-point tensors, so there the packed 4-bit weights are stored in the
    compute dtype (bnb_4bit_quant_storage) instead of uint8; the bytes are the same.
    """
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and bf16_supported() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if base_is_sharded() else torch.uint8,
        **({"llm_int8_skip_modules": ["qa_outputs"]} if span_head else {}),
    )


def check_bitsandbytes() -> None:
    """bitsandbytes is installed and can quantize to 4-bit here (a tiny round trip), or a one-line error."""
    try:
        import bitsandbytes.functional as bnbf

        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed, state = bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        if not torch.allclose(bnbf.dequantize_4bit(packed, state).float().cpu(), torch.ones(64, 64)):
            raise RuntimeError("4-bit round trip gave wrong values")
    except Exception as e:  # ImportError, a missing native library, an unsupported device
        raise PeftT5Error(f"--qlora needs bitsandbytes with 4-bit support on this machine ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); `pip install bitsandbytes`, or train without --qlora")
    explain_4bit_kernels()


def compute_as_in_training(quantized_model: torch.nn.Module) -> None:
    """Keep 4-bit layers on one compute path: dequantize, then matmul in the compute dtype.

    On CPUs with AVX512-BF16, bitsandbytes' first no-grad eval forward repacks the weights for a bf16
    kernel that has no autograd; training after an evaluation would then backpropagate through it
    incorrectly, and merged weights could not reproduce the model as trained.
    """
    import bitsandbytes as bnb

    for module in quantized_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _from_pretrained(name: str, trust_pickle: bool, span_head: bool = False, **kwargs) -> PreTrainedModel:
    """from_pretrained that reads safetensors only, unless the user trusts pickled weights."""
    from transformers import AutoModelForQuestionAnswering

    problem = model_problem(name)
    if problem:
        raise PeftT5Error(problem)
    auto = AutoModelForQuestionAnswering if span_head else AutoModelForSeq2SeqLM
    try:
        return auto.from_pretrained(name, use_safetensors=None if trust_pickle else True, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (" (pickled .bin weights are refused unless you pass --trust_pickle)"
                if Path(name).is_dir() and not trust_pickle and list(Path(name).glob("*.bin")) else "")
        raise PeftT5Error(f"{name}: cannot load a seq2seq model ({first}){hint}; pass a Hub id, a folder with "
                          "config.json and model.safetensors, or tiny")


def quantize(model: PreTrainedModel) -> PreTrainedModel:
    """A model built in memory, loaded again with its linear layers in 4-bit NF4 (as for training).

    bitsandbytes quantizes on load, so the weights go through a temporary folder.
    """
    from transformers import AutoModelForQuestionAnswering

    check_bitsandbytes()
    span_head = has_span_head(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        auto = AutoModelForQuestionAnswering if span_head else AutoModelForSeq2SeqLM
        quantized = auto.from_pretrained(tmp, quantization_config=quantization_config(span_head))
    compute_as_in_training(quantized)
    return quantized


def load_base_model(name: str, qlora: bool = False, dtype: torch.dtype = torch.float32,
                    trust_pickle: bool = False, span_head: bool = False) -> PreTrainedModel:
    """A seq2seq base from a Hub id, a local folder or `tiny`; with qlora, its linear layers in 4-bit NF4; with
    span_head, as T5ForQuestionAnswering (its qa_outputs head new, unless the folder has one)."""
    if qlora and name == TINY:
        return quantize(tiny_model(span_head))
    if qlora:
        check_bitsandbytes()
        config = quantization_config(span_head)
        storage = config.bnb_4bit_quant_storage
        # a float storage (FSDP/ZeRO-3) needs the unquantized weights in that dtype too, or the shards mix dtypes
        model = _from_pretrained(name, trust_pickle, span_head, quantization_config=config,
                                 **({"dtype": storage} if storage.is_floating_point else {}))
        compute_as_in_training(model)
        return model
    if name == TINY:
        return tiny_model(span_head).to(dtype)
    return _from_pretrained(name, trust_pickle, span_head, dtype=dtype)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of linear layers, the names LoRA's target_modules match against."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear")})


def check_target_modules(model: torch.nn.Module, targets) -> None:
    """Refuse --target_modules names that match no linear layer of the model, naming the ones it has."""
    if targets and not isinstance(targets, str) and targets != ["all-linear"]:
        existing = linear_module_names(model)
        missing = sorted(set(targets) - set(existing))
        if missing:
            raise PeftT5Error(f"--target_modules {','.join(missing)} match no layer of this model; "
                              f"its linear layers are named: {', '.join(existing)}")


def prepare_for_training(base: PreTrainedModel, method, settings: dict, total_steps: int):
    """The model that trains: the base wrapped with a fresh adapter of the method, or for full fine-tuning the base
    itself; --layers (settings["layers"]) limits either to the blocks it names."""
    blocks = layer_blocks(settings.get("layers"), base.config)
    check_target_modules(base, settings.get("target_modules"))
    config = method.build(settings, total_steps)
    span_head = has_span_head(base)
    if config is None:  # full: no adapter
        return train_only_blocks(base, blocks, also=("qa_outputs.",) if span_head and blocks else ())
    if span_head:  # PEFT's QUESTION_ANS kind trains and saves the new qa_outputs head beside the adapter
        config.task_type = "QUESTION_ANS"
    return add_adapter(base, config)


def has_span_head(model: torch.nn.Module) -> bool:
    """A T5ForQuestionAnswering (or a PEFT model around one, which passes the attribute on): answers are spans."""
    return hasattr(model, "qa_outputs")


def train_only_blocks(model: PreTrainedModel, blocks: dict[str, list[int]] | None,
                      also: tuple[str, ...] = ()) -> PreTrainedModel:
    """Every weight trains (blocks None), or only those inside the named blocks (and those starting with `also`):
    embeddings, final norms and the output projection are frozen with the other blocks."""
    prefixes = None if blocks is None else \
        tuple(f"{stack}.block.{n}." for stack, ns in blocks.items() for n in ns) + also
    for name, param in model.named_parameters():
        param.requires_grad_(prefixes is None or name.startswith(prefixes))
    return model


def add_adapter(model: PreTrainedModel, config):
    """Wrap `model` with a fresh adapter of a PEFT config (see methods.py); a 4-bit model is first prepared for
    k-bit training, and target modules that match no layer are refused."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, getattr(config, "target_modules", None))
    if getattr(model, "is_loaded_in_4bit", False):
        # T5 in k-bit needs this (fp32 norms, input grads) or backward fails with "does not require grad".
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def add_lora(model: PreTrainedModel, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=None):
    """Wrap `model` with a fresh LoRA adapter (the default method, with its usual flags)."""
    lora = get_method("lora")
    settings = lora.settings({"lora_r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                              "target_modules": target_modules})
    return add_adapter(model, lora.build(settings, 0))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a PeftModel counts each 4-bit weight as the values it stands for."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
