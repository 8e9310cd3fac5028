"""Hugging Face transformers-format folders, in and out.

In: a folder as transformers saves it (config.json + model.safetensors, sharded model-*.safetensors with
an index, or pytorch_model*.bin) is recognised from its files (`is_hf_folder`) wherever a model folder is
loaded (Family.load_model / load_tokenizer call `load_model` / `load_tokenizer` here). Its weights are
converted in memory with the family's name mapping (paddlenlp's own converter mapping where it is right,
else the family registry's): nothing is written into the user's folder.

Out: `paddlellm export-hf --model_name_or_path DIR --output_path OUT [--dtype ...]` (and
`merge_lora_params.py --output_format hf`) write a folder that transformers' AutoModelForCausalLM and
AutoTokenizer load: config.json in transformers' schema, model.safetensors with transformers' names and
layout, tokenizer files. Families without a transformers architecture of the same design are refused.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from ..arguments import UserError
from ..files import write_json as _write_json

CONFIG = "config.json"
SAFE_INDEX, SAFE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
# safetensors "format" metadata: transformers writes "pt" (other frameworks tf/flax/mlx, some tools none);
# paddlenlp writes "np" and refuses anything else.
PADDLE_FORMATS = ("np", "paddle")
DTYPES = ["float32", "float16", "bfloat16"]


def _log(msg: str) -> None:
    print(f"paddlellm: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- detection
def weight_files(path: str) -> List[str]:
    """The transformers weight files of a folder (an index's shards, or the single file), else []."""
    for index, single in ((SAFE_INDEX, SAFE), (BIN_INDEX, BIN)):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index), encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, n) for n in names]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    return []


def _safetensors_format(path: str) -> Optional[str]:
    """The "format" entry of a safetensors file's header metadata (read without loading any tensor)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return (header.get("__metadata__") or {}).get("format")


def is_hf_folder(path) -> bool:
    """Whether `path` is a folder of transformers-format weights (torch layout), judged from its files."""
    if not isinstance(path, str) or not os.path.isfile(os.path.join(path, CONFIG)):
        return False
    files = weight_files(path)
    if not files:
        return False
    if files[0].endswith(".bin"):
        # paddlenlp prefers its own model_state.pdparams to .bin files (e.g. one its converter left behind)
        return not any(n.endswith(".pdparams") for n in os.listdir(path))
    try:  # paddlenlp reads safetensors before anything else, and only its own "np" format
        return _safetensors_format(files[0]) not in PADDLE_FORMATS
    except (OSError, ValueError, struct.error):
        return False  # unreadable: let paddlenlp report it


def read_config(path: str) -> Dict:
    with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
        return json.load(f)


def check_folder(family, path: str) -> None:
    """UserError in one line when a transformers folder can't be read for `family`; cheap (no paddle)."""
    if family.hf_architecture is None:
        raise UserError(f"{path}: a transformers-format {family.name} checkpoint can't be read: {family.hf_refusal}")
    for f in weight_files(path):
        if not os.path.isfile(f):
            raise UserError(f"{path}: weight file {os.path.basename(f)} (listed in its index) is missing")
    try:
        family.hf_config_to_paddle(read_config(path))
    except ValueError as e:
        raise UserError(f"{path}: the {family.name} family can't reproduce this transformers model: {e}") from None


def refuse_unreadable(family, path: Optional[str]) -> None:
    """If `path` is a transformers folder, UserError unless `family` can read it (the cheap check commands run first)."""
    if path and os.path.isdir(path) and is_hf_folder(path):
        check_folder(family, path)


# --------------------------------------------------------------------------- weights
def _bits_bf16_to_float32(a):
    """bfloat16 stored as raw uint16 (paddlenlp's torch reader gives it so) -> float32, exactly."""
    import numpy as np

    return (a.astype(np.uint32) << 16).view(np.float32)


def read_state(files: List[str]) -> Dict:
    """name -> paddle tensor (CPU) of every tensor in transformers weight files, in their stored dtype."""
    import numpy as np
    import paddle

    from ..runtime import progress_bar

    state = {}
    with progress_bar(len(files), "reading transformers weights", "file") as bar:
        for f in files:
            try:
                if f.endswith(".safetensors"):
                    from safetensors import safe_open

                    with safe_open(f, framework="paddle", device="cpu") as sf:
                        for k in sf.keys():
                            state[k] = sf.get_tensor(k)
                else:
                    # paddlenlp's torch-free reader of torch.save zip files (numpy arrays; bfloat16 as uint16).
                    from paddlenlp.utils.serialization import load_torch

                    for k, a in load_torch(f).items():
                        a = np.ascontiguousarray(a)
                        state[k] = paddle.to_tensor(_bits_bf16_to_float32(a) if a.dtype == np.uint16 else a, place=paddle.CPUPlace())
            except Exception as e:  # a truncated or foreign file: say which
                raise UserError(f"{f}: can't read these weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            bar.update(1)
    return state


def name_mappings(family, config):
    """The family's (transformers name, paddlenlp name, action, index) list for this config."""
    saved = getattr(config, "architectures", None)
    config.architectures = [family.hf_architecture]  # paddlenlp's mappings prefix names by this
    try:
        return family.hf_name_mappings(config)
    finally:
        config.architectures = saved


def to_paddle(family, hf_state: Dict, mappings) -> Dict:
    """transformers tensors -> paddlenlp names/layout. UserError names tensors left unexplained."""
    import paddle

    out, used = {}, set()
    for src, dst, action, index in mappings:
        if src not in hf_state:
            # Checkpoints saved from the bare model (gpt2, bloom-560m, opt-125m on the Hub) lack the head
            # model's prefix (transformer., model.); transformers accepts them, so do we.
            src = src.split(".", 1)[-1]
            if src not in hf_state:
                continue
        t = hf_state[src]
        used.add(src)
        if action == "transpose":
            t = t.transpose([1, 0])
        elif action == "split":
            t = paddle.split(t, 3, axis=-1)[index]
        elif action not in (None, "tied"):
            raise UserError(f"the {family.name} family's transformers mapping has an action paddlellm can't apply ({action!r})")
        out[dst] = t
    left = [k for k in hf_state if k not in used and not any(re.search(p, k) for p in family.hf_buffers)]
    if left:
        raise UserError(f"the {family.name} family can't place {len(left)} tensor(s) of this transformers checkpoint "
                        f"(e.g. {left[0]}): not a plain {family.hf_architecture}?")
    return out


def to_hf(family, state: Dict, mappings, skip=()) -> Dict:
    """paddlenlp tensors -> transformers names/layout (the inverse of to_paddle). `skip`: tied copies.

    A "tied" mapping entry only reads (a head tied to the embeddings in a transformers checkpoint that
    stores it once); list it before the head's own entry, which wins when the checkpoint has it."""
    import paddle

    out, parts, used = {}, {}, set()
    for src, dst, action, index in mappings:
        if dst not in state:
            continue
        t = state[dst]
        used.add(dst)
        if action == "transpose":
            out[src] = t.transpose([1, 0])
        elif action == "split":
            parts.setdefault(src, {})[index] = t
            if len(parts[src]) == 3:
                out[src] = paddle.concat([parts[src][i] for i in range(3)], axis=-1)
        elif action is None:
            out[src] = t
        elif action == "tied":
            pass  # an import-only copy of a tied tensor (the head itself is written under its own name)
        else:
            raise UserError(f"the {family.name} family's transformers mapping has an action paddlellm can't invert ({action!r})")
    left = [k for k in state if k not in used and k not in skip]
    if left:
        raise UserError(f"the {family.name} family has no transformers name for {len(left)} weight(s) (e.g. {left[0]})")
    return out


def _tied(model) -> Dict[str, str]:
    """state_dict name -> the first name holding the same parameter (tied weights appear under several names)."""
    first, tied = {}, {}
    for k, v in model.state_dict().items():
        key = getattr(v, "name", None) or id(v)
        if key in first:
            tied[k] = first[key]
        else:
            first[key] = k
    return tied


def load_model(family, path: str, dtype: str = "float32", **config_overrides):
    """A paddlenlp model of `family` with the weights of the transformers folder `path` (converted in memory)."""
    check_folder(family, path)
    if int(config_overrides.get("tensor_parallel_degree") or 1) > 1:
        # The conversion here builds whole tensors; splitting them per rank is not implemented (nor testable on CPU).
        raise UserError(f"{path}: a transformers-format folder loads on one card only here, not with tensor_parallel_degree "
                        f"{config_overrides['tensor_parallel_degree']}")
    hf_cfg = read_config(path)
    kwargs = family.hf_config_to_paddle(hf_cfg)
    kwargs.update(config_overrides)
    config = family.paddlenlp_class("config_class")(**kwargs)
    config.dtype = dtype
    files = weight_files(path)
    state = to_paddle(family, read_state(files), name_mappings(family, config))
    model = family.paddlenlp_class("model_class").from_config(config, dtype=dtype)
    own = model.state_dict()
    tied = _tied(model)
    missing = [k for k in own if k not in state and tied.get(k) not in state]
    if missing:
        raise UserError(f"{path}: the {family.name} transformers checkpoint lacks {len(missing)} weight(s) the model needs "
                        f"(e.g. {missing[0]})")
    for k, v in state.items():
        if k not in own:
            raise UserError(f"{path}: the {family.name} mapping produced {k}, which {family.model_class} does not have")
        if list(v.shape) != list(own[k].shape):
            raise UserError(f"{path}: tensor {k} has shape {list(v.shape)}, but config.json implies {list(own[k].shape)}")
        state[k] = v.astype(own[k].dtype) if v.dtype != own[k].dtype else v
    for k, first in tied.items():  # the same tensor under its tied name too (else paddle warns it skipped one)
        if k not in state and first in state:
            state[k] = state[first]
    model.set_state_dict(state)
    model.eval()
    _log(f"{path}: read a transformers {(hf_cfg.get('architectures') or [family.hf_architecture])[0]} checkpoint ({len(files)} file(s), "
         f"{len(state)} tensors) and converted it in memory to paddlenlp {family.model_class}; the folder is unchanged")
    return model


# --------------------------------------------------------------------------- tokenizers
def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def special_tokens(path: str) -> Dict[str, str]:
    """bos/eos/unk/pad token texts from tokenizer_config.json and special_tokens_map.json."""
    out = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                cfg = json.load(f)
            for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
                if _token_text(cfg.get(k)):
                    out.setdefault(k, _token_text(cfg[k]))
    return out


_temp_dirs: List[str] = []


def _temp_dir() -> str:
    """A folder for files a tokenizer keeps reading (removed at exit), never inside the user's folder."""
    if not _temp_dirs:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _temp_dirs])
    d = tempfile.mkdtemp(prefix="paddlellm-hf-")
    _temp_dirs.append(d)
    return d


def _bpe_files(path: str):
    """(vocab.json, merges.txt) of a byte-level BPE folder: the files themselves, or taken out of tokenizer.json."""
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return vocab, merges
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        return None
    with open(tj, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    table = dict(model["vocab"])
    for added in spec.get("added_tokens", []):  # special tokens may live only here
        table.setdefault(added["content"], added["id"])
    out = _temp_dir()
    vocab, merges = os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        json.dump(table, f, ensure_ascii=False)
    with open(merges, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:  # "a b" strings (older tokenizers) or [a, b] pairs
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    return vocab, merges


def load_tokenizer(family, path: str):
    """The family's paddlenlp tokenizer built from a transformers folder's tokenizer files and special tokens,
    or from a folder whose tokenizer is a fast tokenizer.json only (see fast_tokenizer_file)."""
    if is_hf_folder(path):
        check_folder(family, path)
    fast = fast_tokenizer_file(family, path)
    if fast:
        return load_fast_tokenizer(family, path, fast)
    cls = family.paddlenlp_class("tokenizer_class")
    special = {k: v for k, v in special_tokens(path).items() if k in family.special_tokens or k == "pad_token"}
    if family.tokenizer_kind == "sentencepiece":
        model_file = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise UserError(f"{path}: the {family.name} tokenizer needs the sentencepiece model tokenizer.model or a "
                            f"tokenizer.json, which this folder lacks")
        (arg,) = family.tokenizer_files
        tok = cls(**{arg: model_file}, **special)
    else:
        files = _bpe_files(path)
        if files is None:
            raise UserError(f"{path}: the {family.name} tokenizer needs vocab.json + merges.txt or a byte-level BPE "
                            f"tokenizer.json, which this folder lacks")
        tok = cls(vocab_file=files[0], merges_file=files[1], **special)
    family.fix_tokenizer(tok)
    return tok


# --------------------------------------------------------------------------- fast tokenizers (tokenizer.json)
TOKENIZER_JSON = "tokenizer.json"


def fast_tokenizer_file(family, path) -> Optional[str]:
    """tokenizer.json of a folder whose tokenizer is read by the family's fast class: the family declares one
    (fast_tokenizer_class), and the folder has tokenizer.json but none of the slow tokenizer's files (a
    transformers checkpoint without tokenizer.model, or our own output of such a tokenizer). Else None."""
    if not getattr(family, "fast_tokenizer_class", None) or not isinstance(path, str) or not os.path.isdir(path):
        return None
    tj = os.path.join(path, TOKENIZER_JSON)
    slow = set(family.tokenizer_files.values()) | ({"tokenizer.model"} if family.tokenizer_kind == "sentencepiece" else set())
    if not os.path.isfile(tj) or any(os.path.isfile(os.path.join(path, n)) for n in slow):
        return None
    return tj


def _processor_specials(proc) -> Tuple[List[str], List[str]]:
    """(tokens before $A, tokens after $A) that a tokenizer.json post-processor adds to a single sequence."""
    if not proc:
        return [], []
    kind = proc.get("type")
    if kind == "Sequence":
        before, after = [], []
        for p in proc.get("processors") or []:
            b, a = _processor_specials(p)
            before, after = b + before, after + a
        return before, after
    if kind == "TemplateProcessing":
        before, after, seen = [], [], False
        for piece in proc.get("single") or []:
            if "Sequence" in piece:
                seen = True
            elif "SpecialToken" in piece:
                (after if seen else before).append(piece["SpecialToken"]["id"])
        return before, after
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [proc["cls"][0]], [proc["sep"][0]]
    return [], []  # ByteLevel and the like add no token


def load_fast_tokenizer(family, path: str, tokenizer_json: str):
    """The family's paddlenlp fast tokenizer (e.g. LlamaTokenizerFast) of a tokenizer.json, giving the ids
    transformers gives for the same folder.

    paddlenlp's LlamaTokenizerFast opens every sequence with a BOS by default, and its __init__ replaces the
    file's post-processor by its own (update_post_processor). The checkpoint decides instead:
    tokenizer_config.json's add_bos_token / add_eos_token when it has them, else whether the file's own
    post-processor puts a special token before / after the text. When the two agree, the file's post-processor
    is put back, so encoding follows it exactly and a saved or exported tokenizer.json keeps it."""
    from tokenizers import Tokenizer

    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            spec = json.load(f)
        backend = Tokenizer.from_file(tokenizer_json)
    except Exception as e:
        raise UserError(f"{tokenizer_json}: not a readable tokenizer.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    before, after = _processor_specials(spec.get("post_processor"))
    add_bos = bool(cfg["add_bos_token"]) if cfg.get("add_bos_token") is not None else bool(before)
    add_eos = bool(cfg["add_eos_token"]) if cfg.get("add_eos_token") is not None else bool(after)
    special = special_tokens(path)
    if before and not special.get("bos_token"):
        special["bos_token"] = before[-1]
    if after and not special.get("eos_token"):
        special["eos_token"] = after[0]
    for flag, on, name in (("add_bos_token", add_bos, "bos_token"), ("add_eos_token", add_eos, "eos_token")):
        if on and not special.get(name):
            raise UserError(f"{path}: {flag} is set but the tokenizer names no {name} (tokenizer_config.json)")
    kwargs = {k: special.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}  # None: the file has none
    cls = getattr(importlib.import_module("paddlenlp.transformers"), family.fast_tokenizer_class)
    tok = cls(tokenizer_file=tokenizer_json, add_bos_token=add_bos, add_eos_token=add_eos, **kwargs)
    if bool(before) == add_bos and bool(after) == add_eos and backend.post_processor is not None:
        tok._tokenizer.post_processor = backend.post_processor  # the file's own (see the docstring)
    family.fix_tokenizer(tok)
    return tok


def is_fast(tokenizer) -> bool:
    """Whether a paddlenlp tokenizer is a fast one (backed by a `tokenizers` Tokenizer)."""
    return hasattr(tokenizer, "_tokenizer") and hasattr(tokenizer._tokenizer, "post_processor")


# --------------------------------------------------------------------------- stop tokens and saving
STOP_ATTR = "paddlellm_stop_ids"  # the generation_config.json eos ids a tokenizer carries
GENERATION_CONFIG = "generation_config.json"


def read_stop_ids(path: str) -> List[int]:
    """generation_config.json's eos_token_id of a folder (one id or a list), as a list ([] without one)."""
    p = os.path.join(path, GENERATION_CONFIG) if isinstance(path, str) else ""
    if not p or not os.path.isfile(p):
        return []
    try:
        with open(p, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return []
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if isinstance(i, int)]


def save_tokenizer(tokenizer, out: str) -> str:
    """tokenizer.save_pretrained(out), plus what it leaves out: the chat template (chat_template.jinja) and the
    stop tokens (merged into out/generation_config.json; call it after the model is saved). Returns what to
    record in paddlellm_meta.json as "chat_template" (where the template came from, or "none")."""
    from .. import chat_template

    tokenizer.save_pretrained(out)
    chosen = chat_template.save(tokenizer, out)
    write_stop_ids(out, getattr(tokenizer, STOP_ATTR, None) or [])
    return chosen


def write_stop_ids(out: str, stops: List[int]) -> None:
    if len(stops) < 2:
        return  # one stop token: the config's eos_token_id says it
    p = os.path.join(out, GENERATION_CONFIG)
    gen = {}
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            gen = json.load(f)
    gen["eos_token_id"] = list(stops)
    _write_json(p, gen)


# --------------------------------------------------------------------------- export
def write_tokenizer(family, tokenizer, out: str) -> None:
    """Tokenizer files transformers' AutoTokenizer reads: tokenizer.model (sentencepiece) or vocab.json +
    merges.txt + tokenizer.json (byte-level BPE), tokenizer_config.json and special_tokens_map.json."""
    tmp = tempfile.mkdtemp(prefix="paddlellm-tok-")
    fast = is_fast(tokenizer)
    try:
        tokenizer.save_pretrained(tmp)
        if fast:  # tokenizer.json as is: vocabulary, added tokens, normalizer, pre-tokenizer and post-processor
            shutil.copy(os.path.join(tmp, TOKENIZER_JSON), os.path.join(out, TOKENIZER_JSON))
        elif family.tokenizer_kind == "sentencepiece":
            (name,) = family.tokenizer_files.values()
            shutil.copy(os.path.join(tmp, name), os.path.join(out, "tokenizer.model"))
        else:
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tmp, family.tokenizer_files["vocab_file" if name == "vocab.json" else "merges_file"]),
                            os.path.join(out, name))
            own_writer = getattr(family, "hf_tokenizer_json", None)  # a family whose tokenizer.json is not GPT-2's (Qwen2)
            if own_writer is not None:
                own_writer(out, tokenizer)
            else:
                _write_tokenizer_json(out, tokenizer, add_bos=bool(family.hf_tokenizer_config(tokenizer).get("add_bos_token")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tokenizer, k, None)}
    cfg = dict(special, model_max_length=int(min(getattr(tokenizer, "model_max_length", 10 ** 6) or 10 ** 6, 10 ** 9)))
    if fast:
        # transformers' PreTrainedTokenizerFast encodes with tokenizer.json's post-processor (which the fast
        # loader kept or built to match add_bos_token / add_eos_token)
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=bool(tokenizer.add_bos_token),
                   add_eos_token=bool(tokenizer.add_eos_token))
    else:
        cfg.update(family.hf_tokenizer_config(tokenizer))
    from .. import chat_template

    template = chat_template.of(tokenizer)
    if template is not None:  # transformers 5 reads chat_template.jinja, older versions tokenizer_config.json
        cfg["chat_template"] = template.text
        chat_template.save(tokenizer, out)
    _write_json(os.path.join(out, "tokenizer_config.json"), cfg)
    _write_json(os.path.join(out, "special_tokens_map.json"), special)
    write_stop_ids(out, getattr(tokenizer, STOP_ATTR, None) or [])


def _write_tokenizer_json(out: str, tokenizer, add_bos: bool = False) -> None:
    """tokenizer.json (the fast-tokenizer file; BLOOM's transformers tokenizer reads only this) from vocab/merges.

    add_bos: open every encoded sequence with the bos token (OPT); transformers 5 takes that from this
    file's post-processor, not from tokenizer_config.json."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    tok = ByteLevelBPETokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
    specials = sorted({t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) if t})
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if add_bos:
        bos = tokenizer.bos_token
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    tok.save(os.path.join(out, "tokenizer.json"))


def hf_config(family, config, dtype: str) -> Dict:
    """config.json in transformers' schema for a paddlenlp config of `family`."""
    cfg = {"architectures": [family.hf_architecture], "model_type": family.hf_model_type}
    cfg.update(family.hf_config_from_paddle(config))
    cfg["torch_dtype"] = dtype
    return cfg


def export_model(family, model, tokenizer, out: str, dtype: str = "float32", max_shard_size: str = "5GB") -> None:
    """Write model + tokenizer as a transformers folder into `out` (an existing, empty staging folder).

    Weights larger than max_shard_size are split into model-0000x-of-0000y.safetensors with
    model.safetensors.index.json, the names transformers uses."""
    from paddlenlp.transformers.model_utils import shard_checkpoint
    from safetensors.paddle import save_file

    config = model.config
    tied = _tied(model)
    state = to_hf(family, model.state_dict(), name_mappings(family, config), skip=set(tied))
    state = {k: v.astype(dtype).contiguous() for k, v in state.items()}
    cfg = hf_config(family, config, dtype)
    if family.hf_tied_head:
        # paddlenlp keeps this head as its own weight; transformers ties it to the embeddings unless told not to.
        head, embed = family.hf_tied_head
        tie = bool((state[head].astype("float32") == state[embed].astype("float32")).all())
        if tie:
            del state[head]
        cfg["tie_word_embeddings"] = tie
    shards, index = shard_checkpoint(state, max_shard_size=max_shard_size, weights_name=SAFE)
    for name, shard in shards.items():
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})  # "pt": transformers refuses other formats
    if index is not None:
        _write_json(os.path.join(out, SAFE_INDEX), index)
    _write_json(os.path.join(out, CONFIG), cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    _write_json(os.path.join(out, "generation_config.json"), gen)
    write_tokenizer(family, tokenizer, out)
