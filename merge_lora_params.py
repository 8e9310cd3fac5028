"""Merge LoRA adapters into a standalone model: python merge_lora_params.py [ARGS.json] [--key value ...] (--help lists the arguments)."""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("merge-lora", sys.argv[1:]))
