"""peft-t5: LoRA and QLoRA adapters for T5, trained with the HF Seq2SeqTrainer through PEFT."""

__version__ = "0.1.0"
