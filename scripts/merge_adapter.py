"""Merge an adapter into its base: python scripts/merge_adapter.py --adapter adapters/jokes --output merged/jokes."""
import sys

from peft_t5.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
