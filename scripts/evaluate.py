"""python scripts/evaluate.py --help"""
import sys

from peft_t5.cli import evaluate_main, run

if __name__ == "__main__":
    sys.exit(run(evaluate_main, sys.argv[1:]))
