"""`paddlellm export-hf`: write a model (full, merged, or LoRA output) as a Hugging Face transformers folder."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..arguments import UserError
from ..formats.hf import DTYPES, _log
from ..merge import export_hf


@dataclass
class ExportHFArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "A model folder (base, full fine-tune or merged) or a LoRA output folder (merged with its base first) (required)."})
    output_path: Optional[str] = field(default=None, metadata={"help": "Folder to write the transformers-format model into (required)."})
    dtype: Optional[str] = field(default=None, metadata={"help": "dtype of the saved weights (default: the model's recorded dtype, else float32).", "choices": DTYPES})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapters to merge into model_name_or_path before export (optional: a LoRA folder may be given as model_name_or_path)."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})


def main(argv=None) -> int:
    from ..arguments import check_can_create, fail, parse_args

    (args,) = parse_args([ExportHFArgument], argv, prog="paddlellm export-hf",
                         description="Write a model (full, merged, or LoRA output) as a Hugging Face transformers folder.")
    if not args.model_name_or_path and not args.lora_path:
        fail("model_name_or_path is required: the model (or LoRA output) folder to export")
    if not args.output_path:
        fail("output_path is required: the folder to write the transformers model into")
    try:
        check_can_create(args.output_path, "output_path")
        for src in (args.model_name_or_path, args.lora_path):
            if src and os.path.isdir(src) and os.path.abspath(src) == os.path.abspath(args.output_path):
                raise UserError(f"output_path must differ from the input folder {src!r}")
        from ..loading import resolve_model

        resolve_model(args.model_name_or_path, lora_path=args.lora_path, family_name=args.family)  # cheap checks first
        from ..runtime import setup_runtime

        setup_runtime()
        export_hf(args.model_name_or_path, args.output_path, args.dtype, args.lora_path, args.family)
    except UserError as e:
        fail(str(e))
    _log(f"export-hf: wrote a transformers model to {args.output_path}")
    return 0
