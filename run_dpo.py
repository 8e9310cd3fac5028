"""Align a causal LM on preference pairs (DPO, full or LoRA): python run_dpo.py llm/<family>/dpo_argument.json [--key value ...]"""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("dpo", sys.argv[1:]))
