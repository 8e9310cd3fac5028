"""Tokenize a corpus into PaddleNLP's pretraining files PREFIX.bin + PREFIX.idx (== `paddlellm prepare-pretrain`).

    python create_pretraining_data.py --model_name_or_path MODEL --input_path corpus/ --output_prefix data/corpus --append_eos
"""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("prepare-pretrain", sys.argv[1:]))
