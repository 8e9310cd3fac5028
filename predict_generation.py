"""Batch generation over src/tgt JSONL: python predict_generation.py [ARGS.json] [--key value ...] (--help lists the arguments)."""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("predict", sys.argv[1:]))
