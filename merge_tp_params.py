"""Merge tensor-parallel shards into one checkpoint: python merge_tp_params.py [ARGS.json] [--key value ...] (--help lists the arguments)."""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("merge-tp", sys.argv[1:]))
