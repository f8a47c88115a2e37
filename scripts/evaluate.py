"""python scripts/evaluate.py --help"""
import sys

from peft_t5.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
