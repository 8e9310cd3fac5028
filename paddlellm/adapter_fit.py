"""Refuse, before anything loads, an adapter or --family that does not fit the base model.

paddlenlp loads a base checkpoint with whatever model class it is given and initialises the weights it
can't find at random; LoRA weights of the wrong shape are skipped with a warning. Either way the result
is garbage with exit status 0, so the checks here run on the JSON files alone (no paddle import: the CPU
runtime must be configured before paddle loads) and raise UserError with one line.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .arguments import UserError

# config.json entries that fix the shapes of the weights an adapter was trained against (names as the
# families' config.json files spell them; an entry missing from either side is not compared).
SHAPE_KEYS = ("vocab_size", "padded_vocab_size", "hidden_size", "n_embed", "num_hidden_layers", "num_layers", "n_layer",
              "num_attention_heads", "n_head", "num_key_value_heads", "multi_query_group_num", "kv_channels",
              "intermediate_size", "inner_hidden_size", "ffn_hidden_size", "ffn_dim", "word_embed_proj_dim")
# Other spellings of the same config entry, so a hook reading `config.num_hidden_layers` works on any config.json.
ALIASES = {"num_hidden_layers": ("num_layers", "n_layer"), "num_attention_heads": ("n_head",), "hidden_size": ("n_embed",)}


def _read_json(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class ConfigView:
    """Attribute access to a config.json as read from disk (with ALIASES), for Family.prefix_config_kwargs."""

    def __init__(self, data: Dict):
        self._data = data

    def __getattr__(self, name: str):
        for key in (name,) + ALIASES.get(name, ()):
            if key in self._data:
                return self._data[key]
        for canonical, others in ALIASES.items():
            if name in others and canonical in self._data:
                return self._data[canonical]
        raise AttributeError(name)


def recorded_family(folder: Optional[str]) -> Optional[str]:
    """The family a folder records (our metadata, else config.json's model_type); None when it records none."""
    from .families import family_of

    if not folder or not os.path.isdir(folder):
        return None
    try:
        return family_of(folder).name
    except (ValueError, KeyError):
        return None


def check_fit(family_name: Optional[str], base: str, lora_path: Optional[str], prefix_path: Optional[str]) -> None:
    """UserError when --family contradicts a folder, the adapter's family differs from the base's, or the
    adapter was trained on a base of other shapes (compared through the configs saved with it)."""
    from .families import find_by_name, get_family

    adapter = lora_path or prefix_path
    adapter_family = recorded_family(adapter)
    base_family = recorded_family(base)
    if family_name:
        for what, folder, recorded in (("lora_path" if lora_path else "prefix_path", adapter, adapter_family),
                                       ("model_name_or_path", base, base_family)):
            if recorded and recorded != family_name:
                raise UserError(f"--family {family_name} contradicts {what} {folder!r}, which records family {recorded}; "
                                f"drop --family (it is for a model that does not record its family)")
    if base_family is None and not family_name and not os.path.isdir(base):
        guess = find_by_name(base)  # a PaddleNLP model name: its family is told by the name
        base_family = guess.name if guess is not None else None
    if adapter_family and base_family and adapter_family != base_family:
        raise UserError(f"the base is {base_family} ({base}); the adapter was trained on {adapter_family} ({adapter}): "
                        f"pass --model_name_or_path with the base model the adapter was trained on")
    if not adapter or not os.path.isfile(os.path.join(base, "config.json")):
        return
    base_config = _read_json(os.path.join(base, "config.json"))
    if lora_path:
        # PaddleNLP's LoRAModel.save_pretrained saves the config of the model it was trained on.
        trained = _read_json(os.path.join(lora_path, "config.json"))
        keys = [k for k in SHAPE_KEYS if k in trained and k in base_config]
    else:
        trained = _read_json(os.path.join(prefix_path, "prefix_config.json"))
        family = get_family(family_name or adapter_family or base_family) if (family_name or adapter_family or base_family) else None
        try:
            expected = family.prefix_config_kwargs(ConfigView(base_config)) if family is not None else {}
        except (AttributeError, TypeError):
            expected = {}  # a config.json that lacks what the hook reads: nothing to compare
        base_config = expected
        keys = [k for k in expected if k in trained and trained[k] is not None]
    diff = [f"{k} {trained[k]} there, {base_config[k]} here" for k in keys if trained[k] != base_config[k]]
    if diff:
        raise UserError(f"the adapter {adapter!r} was trained on a base of other shapes than {base!r} ({'; '.join(diff)}): "
                        f"pass --model_name_or_path with the base model the adapter was trained on")
