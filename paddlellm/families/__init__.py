"""The family registry: every family-specific rule lives in one module of this package.

`get_family(name)` by registry name; `family_of(path)` for a model or output folder.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Dict, List

from ..files import META_FILE  # noqa: F401  (re-exported: the metadata file of every folder our commands write)
from .base import IGNORE, Example, Family, logits_of  # noqa: F401

# registry name -> module in this package (names are the llm/<folder> names)
_MODULES = {
    "llama": "llama",
    "chatglm": "chatglm",
    "chatglm_v2": "chatglm_v2",
    "bloom": "bloom",
    "gpt-3": "gpt",
    "opt": "opt",
    "glm": "glm",
    "qwen2": "qwen2",
}



def names() -> List[str]:
    return list(_MODULES)


def get_family(name: str) -> Family:
    if name not in _MODULES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(f".{_MODULES[name]}", __name__).FAMILY


def all_families() -> Dict[str, Family]:
    return {n: get_family(n) for n in _MODULES}


def family_of(path: str) -> Family:
    """The family of a model folder: our own metadata if present, else config.json's model_type.

    Raises ValueError with a one-line reason when the folder is not a model of a known family.
    """
    meta = os.path.join(path, META_FILE)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            fam = json.load(f).get("family")
        if fam:
            return get_family(fam)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{path}: no config.json; pass a model folder (or a real model name with --family)")
    with open(cfg, encoding="utf-8") as f:
        config = json.load(f)
    model_type = str(config.get("model_type", "")).lower()
    for fam in all_families().values():
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"{cfg}: model_type {model_type!r} is not a supported family ({', '.join(_MODULES)})")


def find_by_name(name: str):
    """The family a real model name belongs to (e.g. 'THUDM/chatglm2-6b' -> chatglm_v2), or None.

    Longer hints are tried first so 'chatglm2' wins over 'chatglm' and 'glm'.
    """
    low = name.lower()
    hints = [(h, fam) for fam in all_families().values() for h in (fam.name_hints or fam.model_types)]
    for hint, fam in sorted(hints, key=lambda x: -len(x[0])):
        if hint in low:
            return fam
    return None


def detect_family(family_name, folders, model_name: str) -> Family:
    """The family of a run: --family if given, else the first of `folders` (adapter, then base model) that
    names one, else the real model name. Raises UserError with a one-line reason."""
    from ..arguments import UserError

    if family_name:
        try:
            return get_family(family_name)
        except KeyError as e:
            raise UserError(f"--family: {e.args[0]}") from None
    error = None
    for folder in folders:
        if folder and os.path.isdir(folder):
            try:
                return family_of(folder)
            except ValueError as e:
                error = error or e
    fam = find_by_name(model_name)
    if fam is not None:
        return fam
    if error is not None:
        raise UserError(str(error))
    raise UserError(f"model_name_or_path {model_name!r}: not a folder and its family can't be told from the name; "
                    f"add --family ({' '.join(names())})")


def family_readme(fam: Family) -> str:
    """The text of llm/<family>/README.md, made from the registry so it can't drift from the code."""
    yes = lambda k: "yes" if fam.supports.get(k) else "no"  # noqa: E731
    folder = f"llm/{fam.name}"
    objectives = " or ".join(f"{o} (default)" if i == 0 else o for i, o in enumerate(fam.pretrain_objectives))
    return f"""# {fam.name}

Example checkpoint: `{fam.example_checkpoint}` (paddlenlp `{fam.model_class}`, tokenizer `{fam.tokenizer_class}`).

```bash
python finetune_generation.py {folder}/sft_argument.json    # full fine-tuning
python finetune_generation.py {folder}/lora_argument.json   # LoRA
python finetune_generation.py {folder}/pt_argument.json     # Prefix Tuning
python finetune_generation.py {folder}/ptq_argument.json    # PTQ A8W8 of the SFT output (or: paddlellm quant ...)
python finetune_generation.py {folder}/gptq_argument.json   # GPTQ WINT4 of the SFT output
python run_dpo.py {folder}/dpo_argument.json                # DPO (LoRA) on preference pairs{"" if fam.supports.get("dpo", True) else ": not supported, see Quirks"}
paddlellm tiny --family {fam.name} --output ./tiny-{fam.name}  # a tiny random model to try them on CPU
```

Pretraining (from scratch, or `"continue_training": true` from the weights):

```bash
python create_pretraining_data.py --model_name_or_path {fam.example_checkpoint} --input_path ./corpus --output_prefix ./data/corpus --append_eos
python run_pretrain.py {folder}/pretrain_argument.json    # objective: {objectives}
```

| Pretrain | SFT | LoRA | Prefix Tuning | InTokens packing | PTQ / GPTQ | Shift / Smooth | tensor parallel (SFT, LoRA) | pipeline parallel (SFT) |
|---|---|---|---|---|---|---|---|---|
| {yes("pretrain")} | {yes("sft")} | {yes("lora")} | {yes("prefix")} | {yes("intokens")} | yes | {"yes" if fam.shift_smooth_pairing else "no (norm -> Linear pairing not declared)"} | {yes("tensor_parallel")} | {"yes (" + fam.pipe_model_class + ")" if fam.pipe_model_class else "no (paddlenlp has no *Pipe class)"} |

Quantized folders (int8, or int4 two per byte, with scales) load in `predict_generation.py` and
`flask_server.py` like any model folder (`--quant_runtime int8` keeps the integer weights resident).

## Quirks

{fam.notes}
"""


def write_readmes() -> None:
    """Rewrite every llm/<family>/README.md from the registry (python -m paddlellm.families)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for fam in all_families().values():
        with open(os.path.join(root, "llm", fam.name, "README.md"), "w", encoding="utf-8") as f:
            f.write(family_readme(fam))
