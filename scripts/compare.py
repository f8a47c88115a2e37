"""python scripts/compare.py --help"""
import sys

from peft_t5.cli import compare_main, run

if __name__ == "__main__":
    sys.exit(run(compare_main, sys.argv[1:]))
