"""Train a LoRA (or --qlora) adapter for a task: python scripts/train_lora.py --task jokes [--model tiny] [Trainer flags]."""
import sys

from peft_t5.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
