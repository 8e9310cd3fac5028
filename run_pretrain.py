"""Pretrain a causal LM on PaddleNLP's token files (== `paddlellm pretrain`).

    python run_pretrain.py llm/llama/pretrain_argument.json [--key value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 run_pretrain.py ARGS.json
"""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("pretrain", sys.argv[1:]))
