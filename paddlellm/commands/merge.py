"""`merge_lora_params.py` / `paddlellm merge-lora` and `merge_tp_params.py` / `paddlellm merge-tp`.

    python merge_lora_params.py --lora_path LORA_DIR --merge_model_path OUT [--model_name_or_path BASE]
    python merge_tp_params.py --model_name_or_path TP_DIR --merge_model_path OUT [--dtype float32]

The merging itself is paddlellm.merge.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..arguments import UserError, check_can_create, fail, parse_args
from ..merge import DTYPES, _check_lora_folder, find_shards, merge_lora, merge_tp


def _check_output(out: Optional[str], flag: str, *inputs: Optional[str]) -> str:
    if not out:
        fail(f"{flag} is required: the folder to write the merged model into")
    try:
        check_can_create(out, flag)
    except UserError as e:
        fail(str(e))
    for src in inputs:
        if src and os.path.isdir(src) and os.path.abspath(src) == os.path.abspath(out):
            fail(f"{flag} must differ from the input folder {src!r}")
    return out


@dataclass
class MergeLoraArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model (folder or PaddleNLP name). Optional: the LoRA folder records its base model."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapters: an output folder of finetune_generation.py --lora (required)."})
    merge_model_path: Optional[str] = field(default=None, metadata={"help": "Folder to write the merged, standalone model into (required)."})
    merge_lora_model_path: Optional[str] = field(default=None, metadata={"help": "Same as merge_model_path (the name later PaddleNLP releases use)."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or gpu (default: gpu when available, else cpu). The merge itself is done in float32 on either."})
    dtype: Optional[str] = field(default=None, metadata={"help": "dtype of the saved weights (default: the dtype the adapters were trained in).", "choices": DTYPES})
    with_tokenizer: bool = field(default=True, metadata={"help": "Save the tokenizer (of the LoRA folder, else the base) with the merged model; false = weights and config only."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the folders: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})
    output_format: str = field(default="paddle", metadata={"help": "paddle (PaddleNLP folder) or hf (Hugging Face transformers folder, as paddlellm export-hf writes).", "choices": ["paddle", "hf"]})


def main_lora(argv=None) -> int:
    (args,) = parse_args([MergeLoraArgument], argv, prog="merge_lora_params.py",
                         description="Merge LoRA adapters into their base model and save a standalone model folder.")
    if not args.lora_path:
        fail("lora_path is required: the LoRA output folder to merge")
    out = _check_output(args.merge_model_path or args.merge_lora_model_path, "merge_model_path", args.lora_path, args.model_name_or_path)
    try:
        from ..loading import resolve_model

        _check_lora_folder(args.lora_path)
        resolve_model(args.model_name_or_path, lora_path=args.lora_path, family_name=args.family)  # cheap checks first
        from ..runtime import setup_runtime

        setup_runtime()
        if args.output_format == "hf":  # merged, then written in transformers' layout (paddlellm/formats/hf.py)
            from ..merge import export_hf

            export_hf(args.model_name_or_path, out, dtype=args.dtype, lora_path=args.lora_path, family_name=args.family)
        else:
            merge_lora(args.model_name_or_path, args.lora_path, out, dtype=args.dtype, device=args.device, family_name=args.family,
                       with_tokenizer=args.with_tokenizer)
    except UserError as e:
        fail(str(e))
    print(f"merge-lora: wrote a merged model to {out}", file=sys.stderr)
    return 0


@dataclass
class MergeTPArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Folder of tensor-parallel shards as PaddleNLP's Trainer writes them: model_state.tpXX.pdparams, model.tpXX.safetensors (also size-sharded with an index) or LoRA adapters lora_model_state.tpXX.pdparams (required)."})
    merge_model_path: Optional[str] = field(default=None, metadata={"help": "Folder to write the merged checkpoint into (required)."})
    dtype: Optional[str] = field(default=None, metadata={"help": "dtype of the merged weights (default: as stored in the shards).", "choices": DTYPES})
    with_tokenizer: Optional[bool] = field(default=None, metadata={"help": "Save the tokenizer with the merged weights (default: when the folder holds one)."})
    device: Optional[str] = field(default=None, metadata={"help": "Accepted for compatibility: shards are merged in host memory on one process, with no GPU or launcher."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})


def main_tp(argv=None) -> int:
    (args,) = parse_args([MergeTPArgument], argv, prog="merge_tp_params.py",
                         description="Merge tensor-parallel shards (model or LoRA) into a single-card checkpoint, on one process.")
    if not args.model_name_or_path:
        fail("model_name_or_path is required: the folder of tensor-parallel shards")
    if not os.path.isdir(args.model_name_or_path):
        fail(f"model_name_or_path {args.model_name_or_path!r}: no such folder")
    out = _check_output(args.merge_model_path, "merge_model_path", args.model_name_or_path)
    try:
        find_shards(args.model_name_or_path)  # cheap checks first: before paddle loads
        from ..runtime import setup_runtime

        setup_runtime()
        kind, degree = merge_tp(args.model_name_or_path, out, dtype=args.dtype, with_tokenizer=args.with_tokenizer,
                                device=args.device, family_name=args.family)
    except UserError as e:
        fail(str(e))
    what = "pipeline stages" if kind == "stages" else f"tensor-parallel {'LoRA ' if kind == 'lora' else ''}shards"
    print(f"merge-tp: merged {degree} {what} into {out}", file=sys.stderr)
    return 0


# (kind, pattern with the rank as group 1, whether the match is an index file listing the rank's files)
