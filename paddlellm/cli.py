"""`paddlellm <command> ...`: the same commands as the top-level scripts.

    paddlellm finetune ARGS.json [--key value ...]   == python finetune_generation.py ...
    paddlellm dpo ARGS.json [--key value ...]        == python run_dpo.py ...
    paddlellm prepare-pretrain ... / pretrain ...    == python create_pretraining_data.py / run_pretrain.py ...
    paddlellm predict ...                            == python predict_generation.py ...
    paddlellm merge-lora ... / merge-tp ...          == python merge_lora_params.py / merge_tp_params.py ...
    paddlellm serve ...                              == python flask_server.py ...
    paddlellm quant ARGS.json [--key value ...]      == python finetune_generation.py ARGS.json with do_ptq / do_gptq
    paddlellm export ...                             == python export_model.py ...
    paddlellm tiny --family llama --output DIR       build a tiny random checkpoint
    paddlellm quickstart                             tiny LLaMA + LoRA on the bundled data
"""
from __future__ import annotations

import functools
import importlib
import sys

# command -> (module, entry function, one-line description); modules are imported only when run.
COMMANDS = {
    "finetune": ("paddlellm.commands.finetune", "main", "fine-tune with SFT, LoRA or Prefix Tuning (finetune_generation.py)"),
    "dpo": ("paddlellm.commands.dpo", "main", "align on preference pairs with DPO (paddlenlp's DPOTrainer), full or LoRA (run_dpo.py)"),
    "prepare-pretrain": ("paddlellm.commands.prepare_pretrain", "main", "tokenize a corpus into PaddleNLP's PREFIX.bin/.idx (create_pretraining_data.py)"),
    "pretrain": ("paddlellm.commands.pretrain", "main", "pretrain from scratch or continue, on PREFIX.bin/.idx data (run_pretrain.py)"),
    "predict": ("paddlellm.commands.predict", "main", "batch generation over a src/tgt JSONL file (predict_generation.py)"),
    "merge-lora": ("paddlellm.commands.merge", "main_lora", "merge LoRA adapters into a standalone model (merge_lora_params.py)"),
    "merge-tp": ("paddlellm.commands.merge", "main_tp", "merge tensor-parallel shards into one checkpoint (merge_tp_params.py)"),
    "export": ("paddlellm.commands.export", "main", "export a static-graph step program for --mode static (export_model.py)"),
    "serve": ("paddlellm.serve", "main", "HTTP API + Gradio chat UI (flask_server.py)"),
    "export-hf": ("paddlellm.commands.export_hf", "main", "write a model (full, merged or LoRA output) as a Hugging Face transformers folder"),
    "quant": ("paddlellm.commands.quant", "main", "PTQ (A8W8, WINT8, WINT4) or GPTQ into a real int8/int4 checkpoint (finetune_generation.py with do_ptq/do_gptq)"),
    "tiny": ("paddlellm.commands.tiny", "main", "write a tiny random checkpoint with a real tokenizer"),
    "quickstart": ("paddlellm.quickstart", "main", "build a tiny LLaMA, LoRA-tune it on data/, show dev accuracy before/after"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {c.ljust(width)}  {d}" for c, (_, _, d) in COMMANDS.items())
    return f"usage: paddlellm <command> [args]\n\ncommands:\n{rows}\n\n`paddlellm <command> --help` lists a command's arguments; `paddlellm --version` prints the version."


def run_command(name: str, argv) -> int:
    module, func, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), func)
    if name == "finetune":
        from .commands import quant

        if quant.quant_requested(argv):  # do_ptq / do_gptq: PaddleNLP ran compression from finetune_generation.py too
            entry = functools.partial(quant.run, prog="finetune_generation.py")
    code = entry(list(argv)) or 0
    _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """Workaround (paddle 3.3, CPU/gloo): a rank that has finished can still die with SIGABRT (-6) while
    the interpreter tears down paddle's process group. CI saw it once: a predict run's rank 0 wrote its
    output, printed its last line, then aborted, and the launcher failed the whole job. A rank that
    joined a process group therefore flushes and leaves with os._exit, so that teardown never runs. The
    last collective of each command has already synchronised the ranks, and nothing is left to
    exchange. Outside `paddle.distributed.launch` nothing changes."""
    dist = sys.modules.get("paddle.distributed")
    if dist is None or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    import logging
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a missing command is a usage error (exit 2), as in argparse; --help is not
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"paddlellm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(name, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
