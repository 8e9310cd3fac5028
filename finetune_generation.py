"""Fine-tune a causal LM (SFT, LoRA, Prefix Tuning): python finetune_generation.py llm/<family>/<x>_argument.json [--key value ...]"""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("finetune", sys.argv[1:]))
