"""Weight merging: LoRA adapters into a standalone model, tensor-parallel shards into one checkpoint.

    python merge_lora_params.py --lora_path LORA_DIR --merge_model_path OUT [--model_name_or_path BASE]
    python merge_tp_params.py --model_name_or_path TP_DIR --merge_model_path OUT [--dtype float32]

Both write a folder every command loads (predict, serve, finetune, merge): weights as safetensors,
config.json, the tokenizer and paddlellm_meta.json. Both run on one process on CPU; no GPU or
launcher is needed. A failed merge leaves nothing behind: the folder is built under a temporary name
next to merge_model_path and moved into place at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

from .arguments import UserError
from .checkpoints import Staging
from .files import META_FILE, read_json as _read_json, write_json as _write_json

DTYPES = ["float32", "float16", "bfloat16"]


# --------------------------------------------------------------------------- shared helpers
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def save_tokenizer(family, sources: List[str], out: str, required: bool = True) -> bool:
    """Save the tokenizer of the first folder in `sources` that holds one into `out`, with its chat template and
    stop tokens (formats.hf.save_tokenizer; call it after the weights are written)."""
    from .formats.hf import save_tokenizer as save_with_template

    for src in sources:
        if src and any(os.path.isfile(os.path.join(src, n)) for n in ("tokenizer_config.json", "tokenizer.json")):
            save_with_template(family.load_tokenizer(src), out)
            return True
    if required:
        for src in sources:  # a model name (not a folder): let paddlenlp resolve it
            if src and not os.path.isdir(src):
                save_with_template(family.load_tokenizer(src), out)
                return True
        raise UserError(f"no tokenizer found in {', '.join(repr(s) for s in sources if s)}")
    return False


# --------------------------------------------------------------------------- LoRA
def _check_lora_folder(lora_path: str) -> Dict:
    """lora_config.json of a single-card LoRA folder, or a UserError saying what the folder is not."""
    if not os.path.isdir(lora_path):
        raise UserError(f"lora_path {lora_path!r}: no such folder")
    if not os.path.isfile(os.path.join(lora_path, "lora_config.json")):
        raise UserError(f"lora_path {lora_path!r}: no lora_config.json (not a folder saved by a LoRA fine-tuning run)")
    cfg_json = _read_json(os.path.join(lora_path, "lora_config.json"))
    if int(cfg_json.get("tensor_parallel_degree") or -1) > 1:
        raise UserError(f"lora_path {lora_path!r} holds tensor-parallel shards; merge them first: "
                        f"python merge_tp_params.py --model_name_or_path {lora_path} --merge_model_path LORA_OUT")
    return cfg_json


def merge_lora(model_name_or_path: Optional[str], lora_path: str, out: str, dtype: Optional[str] = None,
               device: Optional[str] = None, family_name: Optional[str] = None, with_tokenizer: bool = True) -> str:
    """Fold W + (alpha / r) * A @ B into every adapted layer and save base + merged weights as a standalone model."""
    from .loading import resolve_model
    from .runtime import select_device

    cfg_json = _check_lora_folder(lora_path)
    base, lora_path, _, family, meta = resolve_model(model_name_or_path, lora_path=lora_path, family_name=family_name)
    select_device(device)
    saved = meta.get("dtype") or cfg_json.get("dtype") or "float32"
    out_dtype = dtype or (saved if saved in DTYPES else "float32")
    inner = merged_lora_model(base, lora_path, family)
    if out_dtype != "float32":
        inner.to(dtype=out_dtype)
    state = {k: v for k, v in inner.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    with Staging(out) as stage:
        inner.config.tensor_parallel_degree = 1
        inner.save_pretrained(stage, state_dict=state, safe_serialization=True)
        if with_tokenizer:
            save_tokenizer(family, [lora_path, base], stage)
        merged_meta = {k: v for k, v in meta.items() if k in ("src_length", "tgt_length", "chat_format", "chat_template")}
        merged_meta.update(family=family.name, kind="base", dtype=out_dtype,
                           merged_from={"base_model": os.path.abspath(base) if os.path.isdir(base) else base,
                                        "lora_path": os.path.abspath(lora_path)})
        _write_json(os.path.join(stage, META_FILE), merged_meta)
    return out


def merged_lora_model(base: str, lora_path: str, family):
    """The base model with the LoRA adapters folded in, in float32, in memory (the LoRA layers' merge)."""
    from paddlenlp.peft import LoRAConfig, LoRAModel

    try:
        # Merge in float32 whatever the adapters were trained in: W + A @ B * scaling is then exact to float32.
        model = family.load_model(base, dtype="float32")
        config = LoRAConfig.from_pretrained(lora_path)
        config.dtype = "float32"
        model = LoRAModel.from_pretrained(model, lora_path, lora_config=config)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"can't load {base!r} with the LoRA adapters in {lora_path!r}: {_first_line(e)}") from None
    model.eval()
    model.merge()
    return model.model


# --------------------------------------------------------------------------- tensor parallel
# (kind, pattern with the rank as group 1, whether the match is an index file listing the rank's files)
SHARD_PATTERNS = [
    ("lora", re.compile(r"^lora_model_state\.tp(\d{2})\.pdparams$"), False),
    ("model", re.compile(r"^model\.safetensors\.index\.tp(\d{2})\.json$"), True),
    ("model", re.compile(r"^model\.tp(\d{2})\.safetensors$"), False),
    ("model", re.compile(r"^model_state\.pdparams\.index\.tp(\d{2})\.json$"), True),
    ("model", re.compile(r"^model_state\.tp(\d{2})\.pdparams$"), False),
]
PIPELINE = re.compile(r"tp\d{2}_pp\d{2}|\.pp\d{2}\.")
STAGE_PATTERN = re.compile(r"^model_state\.pp(\d{2})\.pdparams$")  # the Trainer's save of one pipeline stage


def find_shards(folder: str) -> Tuple[str, List[List[str]]]:
    """(kind, files of rank 0..N-1) of the tensor-parallel checkpoint in `folder`; kind is "model" or "lora"."""
    names = sorted(os.listdir(folder))
    stages = {int(m.group(1)): [os.path.join(folder, n)] for n in names for m in [STAGE_PATTERN.match(n)] if m}
    if stages and not any(PIPELINE.search(n) and not STAGE_PATTERN.match(n) for n in names):
        # pipeline-parallel stages (no tensor parallel): each holds whole tensors of its layers, by their usual names
        missing = [f"pp{r:02d}" for r in range(max(max(stages) + 1, _saved_stages(folder))) if r not in stages]
        if missing:
            raise UserError(f"{folder}: pipeline stages {', '.join(missing)} are missing")
        return "stages", [stages[r] for r in range(len(stages))]
    if any(PIPELINE.search(n) for n in names):
        raise UserError(f"{folder}: holds shards of tensor and pipeline parallel together (*tp00_pp00*); only tensor-parallel "
                        "shards or pipeline stages can be merged here")
    for kind, pattern, is_index in SHARD_PATTERNS:
        ranks: Dict[int, List[str]] = {}
        for name in names:
            m = pattern.match(name)
            if not m:
                continue
            path = os.path.join(folder, name)
            if is_index:
                files = sorted(set(_read_json(path)["weight_map"].values()))
                ranks[int(m.group(1))] = [os.path.join(folder, f) for f in files]
            else:
                ranks[int(m.group(1))] = [path]
        if not ranks:
            continue
        degree = max(max(ranks) + 1, _saved_degree(folder))
        missing = [f"tp{r:02d}" for r in range(degree) if r not in ranks]
        if missing:
            raise UserError(f"{folder}: shards {', '.join(missing)} are missing (found {', '.join(f'tp{r:02d}' for r in sorted(ranks))})")
        for files in ranks.values():
            for f in files:
                if not os.path.isfile(f):
                    raise UserError(f"{folder}: shard file {os.path.basename(f)} (listed in an index) is missing")
        return kind, [ranks[r] for r in range(degree)]
    unified = [n for n in names if re.match(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model_state\.pdparams$", n)]
    if unified:
        raise UserError(f"{folder}: no tensor-parallel shards; it holds {unified[0]}, a single-card or unified checkpoint that loads as it is")
    raise UserError(f"{folder}: no tensor-parallel shards (model_state.tpXX.pdparams, model.tpXX.safetensors or lora_model_state.tpXX.pdparams)")


def _saved_stages(folder: str) -> int:
    """pipeline_parallel_degree of the run that wrote `folder` (its finetune_args.json; 1 when unknown)."""
    try:
        return int(_read_json(os.path.join(folder, "finetune_args.json")).get("pipeline_parallel_degree") or 1)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _saved_degree(folder: str) -> int:
    """tensor_parallel_degree recorded in the folder's config.json (1 when absent)."""
    path = os.path.join(folder, "config.json")
    try:
        return int(_read_json(path).get("tensor_parallel_degree") or 1) if os.path.isfile(path) else 1
    except (ValueError, TypeError, json.JSONDecodeError):
        return 1


def load_shard(files: List[str]) -> Dict:
    """One rank's state dict (paddle tensors on CPU) from its .pdparams / .safetensors files."""
    from paddlenlp.transformers.model_utils import load_state_dict

    state: Dict = {}
    for f in files:
        try:
            state.update(load_state_dict(f))
        except Exception as e:  # a truncated or foreign file: say which one
            raise UserError(f"{f}: can't read this shard ({_first_line(e)})") from None
    return state


def _to_numpy(t):
    """(array, dtype name): bfloat16 has no numpy type, so it travels as float32 (exact) and is cast back."""
    import numpy as np

    if isinstance(t, np.ndarray):
        return t, str(t.dtype)
    name = str(t.dtype).split(".")[-1]
    if name == "bfloat16":
        return t.astype("float32").numpy(), name
    return t.numpy(), name


def _from_numpy(a, dtype: str):
    import paddle

    t = paddle.to_tensor(a, place=paddle.CPUPlace())
    return t.astype(dtype) if str(t.dtype).split(".")[-1] != dtype else t


def _is_column(action: Callable) -> bool:
    """Whether a PaddleNLP merge action concatenates along the output (column) axis.

    The standard actions are partials of PaddleNLP's merge fn with is_column=...; the family-specific
    ones (ChatGLM2's fused qkv and mlp) re-order output columns, i.e. are column-parallel too.
    """
    return bool(getattr(action, "keywords", {}).get("is_column", True))


def tp_actions(model_class, config, keys: List[str], degree: int) -> Dict[str, Callable]:
    """PaddleNLP's own merge actions (is_split=False) of `model_class`, keyed by the real names in `keys`."""
    import copy

    cfg = copy.deepcopy(config)
    cfg.tensor_parallel_degree = degree
    cfg.tensor_parallel_rank = 0
    mappings = model_class._get_tensor_parallel_mappings(cfg, is_split=False)
    resolved = model_class._resolve_prefix_keys(mappings.keys(), keys, ignore_error=True)
    return {real: mappings[base] for base, real in resolved.items()}


def merge_state(shards: List[Dict], actions: Dict[str, Callable], on_tensor: Callable[[], None] = lambda: None) -> Dict:
    """Merge per-rank state dicts: split tensors through their action, replicated ones taken from rank 0."""
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise UserError(f"shard tp{r:02d} holds other parameters than tp00 (e.g. {diff[0]}); are these shards of one checkpoint?")
    merged = {}
    for key in keys:
        if key in actions:
            arrays = [_to_numpy(s[key]) for s in shards]
            merged[key] = _from_numpy(actions[key]([a for a, _ in arrays]), arrays[0][1])
        else:
            shapes = {tuple(s[key].shape) for s in shards}
            if len(shapes) > 1:
                raise UserError(f"parameter {key} has different shapes across shards {sorted(shapes)} but PaddleNLP's "
                                "tensor-parallel mapping does not split it; was the checkpoint written by another model class?")
            merged[key] = shards[0][key]
        for s in shards:
            s.pop(key)  # free memory as we go
        on_tensor()
    return merged


def lora_actions(model_class, config, keys: List[str], degree: int) -> Dict[str, Callable]:
    """Merge actions for LoRA shards: each layer's split factor merges like the layer's own weight.

    A column-parallel layer splits its output axis, so lora_B [r, out] is split and lora_A replicated;
    a row-parallel layer splits its input axis, so lora_A [in, r] is split and lora_B replicated. Using
    the layer weight's own action (rather than a plain concatenation) keeps fused layers whose columns
    PaddleNLP re-orders (GLM's and ChatGLM2's query_key_value) consistent with the merged weight.
    Other trainable tensors (e.g. trainable_modules) merge with their own actions.
    """
    weight_of = {}
    plain = []
    for k in keys:
        owner, _, leaf = k.rpartition(".")
        if leaf.startswith("lora_"):
            weight_of[k] = owner + ".weight"
        else:
            plain.append(k)
    actions = tp_actions(model_class, config, sorted(set(weight_of.values())) + plain, degree)
    out = {k: actions[k] for k in plain if k in actions}
    for k, weight in weight_of.items():
        action = actions.get(weight)
        if action is None:
            continue  # the layer is replicated in tensor parallel: so are its adapters
        leaf = k.rpartition(".")[2]
        if (leaf == "lora_B" and _is_column(action)) or (leaf == "lora_A" and not _is_column(action)):
            out[k] = action
    return out


def write_safetensors_model(out: str, config, state: Dict, max_shard_size: str = "10GB") -> None:
    """config.json, generation_config.json and safetensors weights (with an index when sharded), as save_pretrained writes them."""
    from paddlenlp.generation import GenerationConfig
    from paddlenlp.transformers.model_utils import shard_checkpoint
    from paddlenlp.utils.env import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from safetensors.numpy import save_file

    config.save_pretrained(out)
    try:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    except Exception:  # a config without generation fields: nothing to save
        pass
    shards, index = shard_checkpoint(state, max_shard_size=max_shard_size, weights_name=SAFE_WEIGHTS_NAME)
    for name, shard in shards.items():
        save_file({k: v.numpy() for k, v in shard.items()}, os.path.join(out, name), metadata={"format": "np"})
    if index is not None:
        _write_json(os.path.join(out, SAFE_WEIGHTS_INDEX_NAME), index)


def merge_tp(folder: str, out: str, dtype: Optional[str] = None, with_tokenizer: Optional[bool] = None,
             device: Optional[str] = None, family_name: Optional[str] = None) -> Tuple[str, int]:
    """Merge the tensor-parallel checkpoint in `folder` into `out`. Returns (kind, degree)."""
    from .adapter_fit import check_fit
    from .families import META_FILE, family_of, get_family
    from .loading import read_meta
    from .runtime import select_device

    kind, rank_files = find_shards(folder)
    degree = len(rank_files)
    check_fit(family_name, folder, None, None)  # --family must not contradict the family the folder records
    try:
        family = get_family(family_name) if family_name else family_of(folder)
    except (KeyError, ValueError) as e:
        raise UserError(f"{e.args[0]}; pass --family") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder}: no config.json (the Trainer saves one with the shards); it is needed to know how to merge")
    select_device(device)
    import paddle

    paddle.set_device("cpu")  # merging is concatenation in host memory
    config = family.paddlenlp_class("config_class").from_pretrained(folder)
    saved_degree = int(getattr(config, "tensor_parallel_degree", 1) or 1)
    if saved_degree > 1 and saved_degree != degree:
        raise UserError(f"{folder}: config.json says tensor_parallel_degree {saved_degree} but {degree} shards were found")
    model_class = family.paddlenlp_class("model_class")
    from .runtime import progress_bar

    with progress_bar(degree, "merge-tp: reading", "shard") as bar:
        shards = []
        for files in rank_files:
            shards.append(load_shard(files))
            bar.update(1)
    keys = list(shards[0])
    if kind == "stages":  # pipeline stages hold disjoint layers by their usual names: their union is the model
        shards = [{k: v for s in shards for k, v in s.items()}]
        keys, actions = list(shards[0]), {}
    else:
        actions = (lora_actions if kind == "lora" else tp_actions)(model_class, config, keys, degree)
    for key, same in family.tp_tied_keys.items():  # a tied weight saved under a second name (GPT's lm_head)
        # split like its twin in a Trainer's TP save; a shard holding the whole tensor (as paddlenlp's own split
        # mappings, which leave the name out, cut it) is replicated and taken from rank 0
        if key in keys and same in actions and key not in actions and \
                list(shards[0][key].shape) == list(shards[0][same].shape):
            actions[key] = actions[same]
    with progress_bar(len(keys), "merge-tp: merging", "tensor") as bar:
        state = merge_state(shards, actions, on_tensor=lambda: bar.update(1))
    if dtype:
        state = {k: (v.astype(dtype) if v.dtype in (paddle.float32, paddle.float16, paddle.bfloat16) and str(v.dtype).split(".")[-1] != dtype else v)
                 for k, v in state.items()}
    meta = read_meta(folder)
    if with_tokenizer is None:
        with_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    with Staging(out) as stage:
        config.tensor_parallel_degree = 1
        config.tensor_parallel_rank = 0
        if dtype:
            config.dtype = dtype
        if kind == "lora":
            from paddlenlp.utils.env import LORA_WEIGHTS_NAME

            paddle.save(state, os.path.join(stage, LORA_WEIGHTS_NAME))
            lora_cfg = _read_json(os.path.join(folder, "lora_config.json"))
            lora_cfg["tensor_parallel_degree"] = -1  # what PaddleNLP writes for merged adapters
            if dtype:
                lora_cfg["dtype"] = dtype
            _write_json(os.path.join(stage, "lora_config.json"), lora_cfg)
            config.save_pretrained(stage)
        else:
            config.architectures = [model_class.__name__]
            write_safetensors_model(stage, config, state)
        if with_tokenizer:
            save_tokenizer(family, [folder], stage)
        for name in ("finetune_args.json",):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy(os.path.join(folder, name), os.path.join(stage, name))
        meta = dict(meta)
        meta.setdefault("family", family.name)
        meta.setdefault("kind", "lora" if kind == "lora" else "base")
        if kind == "stages":
            meta["merged_pipeline_stages"] = len(rank_files)
        else:
            meta["merged_tensor_parallel_degree"] = degree
        if dtype:
            meta["dtype"] = dtype
        _write_json(os.path.join(stage, META_FILE), meta)
    return kind, degree


# --------------------------------------------------------------------------- transformers folders
def export_hf(model_name_or_path: Optional[str], out: str, dtype: Optional[str] = None, lora_path: Optional[str] = None,
              family_name: Optional[str] = None) -> str:
    """Export a model folder (or LoRA output, merged first) as a transformers folder at `out`."""
    from .formats.hf import DTYPES as HF_DTYPES, _log, export_model
    from .loading import resolve_model

    base, lora_path, prefix_path, family, meta = resolve_model(model_name_or_path, lora_path=lora_path, family_name=family_name)
    if family.hf_architecture is None:
        raise UserError(f"export-hf: the {family.name} family has no transformers architecture of the same design: {family.hf_refusal}")
    if prefix_path:
        raise UserError(f"export-hf: {prefix_path!r} is a prefix-tuning output; transformers models have no place for "
                        f"its prefix (export a LoRA or full fine-tune instead)")
    dtype = dtype or (meta.get("dtype") if meta.get("dtype") in HF_DTYPES else "float32")
    with Staging(out) as stage:
        source = base
        if lora_path:
            source = os.path.join(stage, ".merged")
            _log(f"export-hf: merging the LoRA adapters in {lora_path} into {base} first")
            merge_lora(base, lora_path, source, dtype="float32", family_name=family.name)
        model = family.load_model(source, dtype="float32")
        tokenizer = family.load_tokenizer(source)
        export_model(family, model, tokenizer, stage, dtype)
        out_meta = {k: v for k, v in meta.items() if k in ("src_length", "tgt_length", "chat_format", "chat_template")}
        out_meta.update(family=family.name, kind="base", format="transformers", dtype=dtype,
                        exported_from=os.path.abspath(lora_path or base) if os.path.isdir(lora_path or base) else base)
        _write_json(os.path.join(stage, META_FILE), out_meta)
        if lora_path:
            shutil.rmtree(source)
    return out
