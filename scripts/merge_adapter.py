"""Merge an adapter into its base: python scripts/merge_adapter.py --adapter adapters/jokes --output merged/jokes."""
import sys

from peft_t5.cli import merge_main, run

if __name__ == "__main__":
    sys.exit(run(merge_main, sys.argv[1:]))
