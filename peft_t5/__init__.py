"""peft-t5: LoRA and QLoRA adapters for T5, trained with the HF Seq2SeqTrainer through PEFT."""

__version__ = "0.1.0"

from .logs import quiet_optional_kernel_notice  # noqa: E402

quiet_optional_kernel_notice()  # bitsandbytes' misleading warning on CPUs with AVX512-BF16, before it is imported
