"""Run several command lines of one command in one launched process group (tests/test_parallel.py).

    python -m paddle.distributed.launch --nproc_per_node 2 tests/parallel_runs.py RUNS.json [COMMAND]

RUNS.json is a list of argument lists; each goes through the function the command's script runs
(paddlellm.cli.COMMANDS[COMMAND]; default finetune, as finetune_generation.py; pretrain is run_pretrain.py's)
in turn, so the launcher and paddle start once for all of them.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

from paddlellm.cli import COMMANDS, _leave_process_group  # noqa: E402

if __name__ == "__main__":
    module, func, _ = COMMANDS[sys.argv[2] if len(sys.argv) > 2 else "finetune"]
    entry = getattr(importlib.import_module(module), func)
    for argv in json.load(open(sys.argv[1], encoding="utf-8")):
        code = entry(list(argv)) or 0
        if code != 0:
            sys.exit(f"run failed ({code}): {argv}")
    _leave_process_group(0)  # as run_command does after a command (paddle's gloo teardown can abort)
