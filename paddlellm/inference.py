"""Load any folder our commands produce (base model, full fine-tune, LoRA or prefix output) for inference."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from .arguments import UserError


def read_meta(path: str) -> Dict:
    from .families import META_FILE

    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def load_for_inference(model_name_or_path: Optional[str] = None, lora_path: Optional[str] = None,
                       prefix_path: Optional[str] = None, dtype: str = "float32", family=None):
    """Returns (model, tokenizer, family, meta). A LoRA/prefix folder alone is enough: it records its base model."""
    from .families import family_of

    adapter = lora_path or prefix_path
    meta = read_meta(adapter) if adapter else {}
    if model_name_or_path and not adapter:
        own = read_meta(model_name_or_path)
        if own.get("kind") == "lora":
            lora_path, adapter, meta = model_name_or_path, model_name_or_path, own
            model_name_or_path = None
        elif own.get("kind") == "prefix":
            prefix_path, adapter, meta = model_name_or_path, model_name_or_path, own
            model_name_or_path = None
        else:
            meta = own
    base = model_name_or_path or meta.get("base_model")
    if not base:
        raise UserError("model_name_or_path is required (the adapter folder does not record its base model)")
    if not os.path.isdir(base) and base.startswith((".", "/", "~")):
        raise UserError(f"model_name_or_path {base!r}: no such folder")
    try:
        family = family or family_of(adapter or base)
    except ValueError as e:
        raise UserError(str(e)) from None
    tokenizer = family.load_tokenizer(adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base)
    model = family.load_model(base, dtype=dtype)
    if lora_path:
        from paddlenlp.peft import LoRAModel

        model = LoRAModel.from_pretrained(model, lora_path)
    elif prefix_path:
        from paddlenlp.peft import PrefixModelForCausalLM

        postprocess, pad_mask = family.prefix_hooks()
        model = PrefixModelForCausalLM.from_pretrained(model, prefix_path, postprocess, pad_mask)
    model.eval()
    return model, tokenizer, family, meta


def generate_replies(model, tokenizer, family, records, src_length: int, max_new_tokens: int, batch_size: int = 8, **sampling):
    """Replies (text) to the final src turn of each record, batched by prompt length, in input order."""
    from .generation import decode, generate_ids, length_buckets

    prompts = [family.generation_prompt(tokenizer, r.src, r.tgt[: len(r.src) - 1], src_length) for r in records]
    out = [None] * len(records)
    for idx in length_buckets([len(p) for p in prompts], batch_size):
        for i, ids in zip(idx, generate_ids(model, tokenizer, family, [prompts[i] for i in idx], max_new_tokens, **sampling)):
            out[i] = decode(tokenizer, ids)
    return out
