"""python scripts/compare.py --help"""
import sys

from peft_t5.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
