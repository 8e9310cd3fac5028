"""Load any folder our commands produce (base model, full fine-tune, LoRA or prefix output) for inference."""
from __future__ import annotations

import json
import os
from typing import Optional

from .arguments import UserError
from .files import read_meta




def load_for_inference(model_name_or_path: Optional[str] = None, lora_path: Optional[str] = None,
                       prefix_path: Optional[str] = None, dtype: str = "float32", family=None, mode: Optional[str] = None,
                       quant_runtime: str = "float32", chat_template: Optional[str] = None):
    """Returns (model, tokenizer, family, meta). A LoRA/prefix folder alone is enough: it records its base model.

    mode: "dynamic", "static" (a folder written by export_model.py) or None (static exactly when the folder is one).
    quant_runtime (quantized folders only): "float32" dequantizes the weights at load, "int8" keeps them resident.
    chat_template: the run's --chat_template (None: the tokenizer folder's own, "none", or a file; Family.load_tokenizer)."""
    base, lora_path, prefix_path, family, meta = resolve_model(model_name_or_path, lora_path, prefix_path,
                                                               family.name if family is not None else None)
    # --- static-graph exports (export_model.py): a 0-layer generate() host answered by paddle.inference ---
    from .formats.static import check_static_request, load_static

    if check_static_request(base, mode, lora_path, prefix_path):
        model, tokenizer = load_static(base, family, chat_template=chat_template)
        return model, tokenizer, family, meta
    # --- end static-graph exports ---
    adapter = lora_path or prefix_path
    tokenizer = family.load_tokenizer(adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base,
                                      chat_template=chat_template)
    # --- quantized folders (paddlellm quant output): see paddlellm/formats/quantized.py
    from .formats.quantized import is_quantized_folder, load_quantized_model

    if is_quantized_folder(base):
        model = load_quantized_model(family, base, quant_runtime)
    else:
        model = family.load_model(base, dtype=dtype)
    # --- end quantized folders
    from .cpu_kernels import apply as apply_cpu_kernels

    model = apply_cpu_kernels(family, model)  # cheaper CPU formulations of the same maths (before adapters wrap it)
    if lora_path:
        from paddlenlp.peft import LoRAModel

        model = LoRAModel.from_pretrained(model, lora_path)
    elif prefix_path:
        from paddlenlp.peft import PrefixModelForCausalLM

        postprocess, pad_mask = family.prefix_hooks()
        model = PrefixModelForCausalLM.from_pretrained(model, prefix_path, postprocess, pad_mask)
    model.eval()
    return model, tokenizer, family, meta


def check_adapter_folders(lora_path: Optional[str], prefix_path: Optional[str]) -> None:
    """UserError unless each given adapter folder exists and holds its config (and at most one is given)."""
    if lora_path and prefix_path:
        raise UserError("pass one of lora_path and prefix_path, not both")
    for flag, folder, cfg in (("lora_path", lora_path, "lora_config.json"), ("prefix_path", prefix_path, "prefix_config.json")):
        if folder and not os.path.isdir(folder):
            raise UserError(f"{flag} {folder!r}: no such folder")
        if folder and not os.path.isfile(os.path.join(folder, cfg)):
            raise UserError(f"{flag} {folder!r}: no {cfg} (not a folder saved by a {flag.split('_')[0]} fine-tuning run)")


def resolve_model(model_name_or_path: Optional[str] = None, lora_path: Optional[str] = None,
                  prefix_path: Optional[str] = None, family_name: Optional[str] = None):
    """Work out, without loading anything heavy, what load_for_inference will load.

    Returns (base, lora_path, prefix_path, family, meta): `meta` is the adapter's (or the model folder's)
    paddlellm_meta.json. A LoRA/prefix output passed as model_name_or_path is recognised as such.
    Raises UserError with a one-line reason (missing or unknown model, wrong adapter folder, unknown family,
    an adapter that does not fit the base, a --family that contradicts a folder).
    """
    check_adapter_folders(lora_path, prefix_path)
    adapter = lora_path or prefix_path
    meta = read_meta(adapter) if adapter else {}
    if model_name_or_path and not adapter and os.path.isdir(model_name_or_path):
        own = read_meta(model_name_or_path)
        if own.get("kind") == "lora":
            lora_path = adapter = model_name_or_path
            model_name_or_path = None
        elif own.get("kind") == "prefix":
            prefix_path = adapter = model_name_or_path
            model_name_or_path = None
        meta = own
    base = model_name_or_path or meta.get("base_model")
    if not base and adapter:
        # A LoRA folder written by PaddleNLP itself records its base in lora_config.json.
        cfg_path = os.path.join(adapter, "lora_config.json" if lora_path else "prefix_config.json")
        with open(cfg_path, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UserError("model_name_or_path is required (a model folder or a PaddleNLP model name; "
                        "an adapter folder needs it when it does not record its base model)")
    if not os.path.isdir(base) and base.startswith((".", "/", "~")):
        if not model_name_or_path and adapter:
            raise UserError(f"the base model {base!r} recorded in {adapter!r} is not there (moved or deleted?); "
                            f"pass --model_name_or_path with its new place")
        raise UserError(f"model_name_or_path {base!r}: no such folder")
    if adapter:  # adapters were trained on float weights (quantized folders: paddlellm/formats/quantized.py)
        from .formats.quantized import refuse_if_quantized

        refuse_if_quantized(base, "the base model of an adapter,")
    family = checked_family(family_name, base, lora_path, prefix_path)
    return base, lora_path, prefix_path, family, meta


def checked_family(family_name: Optional[str], base: str, lora_path: Optional[str] = None,
                   prefix_path: Optional[str] = None):
    """The family of a run (--family, else the adapter's or the base's folder, else the model name), after
    the checks every command shares, each one line: --family against what the folders record and the
    adapter against its base (family and shapes, see adapter_fit), and a transformers folder the family
    can't read (see hf). Used by resolve_model and by fine-tuning, which resolves its folders itself."""
    from .adapter_fit import check_fit
    from .families import detect_family
    from .formats.hf import refuse_unreadable

    family = detect_family(family_name, (lora_path or prefix_path, base), base)
    check_fit(family_name, base, lora_path, prefix_path)
    refuse_unreadable(family, base)
    return family
