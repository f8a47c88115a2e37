"""Generate with one or more adapters on one base:
python scripts/generate.py --adapter squad=adapters/squad --adapter jokes=adapters/jokes --task jokes "Why did the scarecrow win an award?"
"""
import sys

from peft_t5.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
