"""Real low-bit storage of a quantized model, and loading it back for predict and serve.

Layout of `quant_model.safetensors` (written by `paddlellm quant`):
  <linear>.qweight       int8 [in, out] (8 bits) or uint8 [ceil(in/2), out] (4 bits: two per byte,
                         the even input row in the low nibble, the odd one in the high nibble)
  <linear>.weight_scale  float32 [out]: weight = qweight * weight_scale (symmetric, per output channel)
  <linear>.act_scale     float32 [1] (A8W8 only): activations are fake-quantized to int8 with this abs-max
  everything else        float32, under the model's own state-dict names (embeddings, norms, LM head, biases)

The file is deliberately not named like a float checkpoint: paddlenlp's `from_pretrained` would otherwise
read it, find no `<linear>.weight`, and silently initialise every Linear layer at random.

Importing this module is cheap (paddle is imported inside the functions).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from ..arguments import UserError

WEIGHTS_FILE = "quant_model.safetensors"
CONFIG_FILE = "quant_config.json"
RUNTIMES = ("float32", "int8")


def is_quantized_folder(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def refuse_if_quantized(path: Optional[str], what: str = "model_name_or_path") -> None:
    """UserError for a quantized folder where float weights are needed (training, merging, adapters)."""
    if is_quantized_folder(path):
        raise UserError(f"{what} {path!r} is a quantized model (paddlellm quant output): it can only be used for "
                        f"prediction and serving; fine-tune, merge or quantize its float source model instead")


def read_config(path: str) -> Dict:
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- integer codes
def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def pack_int4(q):
    """int8 codes in [-8, 7], shape [in, out] -> uint8 [ceil(in/2), out], two codes per byte."""
    import numpy as np

    if q.shape[0] % 2:
        q = np.concatenate([q, np.zeros([1, q.shape[1]], q.dtype)])
    u = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(p, rows: int):
    """paddle uint8 [ceil(rows/2), out] -> paddle int32 codes [rows, out] (inverse of pack_int4)."""
    import paddle

    x = p.astype("int32")
    lo, hi = x % 16, x // 16
    lo = paddle.where(lo >= 8, lo - 16, lo)
    hi = paddle.where(hi >= 8, hi - 16, hi)
    both = paddle.stack([lo, hi], axis=1).reshape([-1, p.shape[1]])
    return both[:rows]


def fake_quant_activation(x, act_scale):
    """A8W8 on CPU: round activations to the int8 grid of their calibrated abs-max (there is no int8 GEMM here)."""
    import paddle

    s = paddle.clip(act_scale, min=1e-8) / 127.0
    return paddle.clip(paddle.round(x / s), -127.0, 127.0) * s


# --------------------------------------------------------------------------- layers
def _quant_linear_class():
    import paddle
    import paddle.nn.functional as F

    class QuantLinear(paddle.nn.Layer):
        """A Linear layer whose integer weights stay resident; dequantized at every forward (`--quant_runtime int8`)."""

        def __init__(self, in_features: int, out_features: int, bits: int, has_bias: bool, a8: bool):
            super().__init__()
            self.in_features, self.out_features, self.bits = in_features, out_features, bits
            rows = in_features if bits == 8 else (in_features + 1) // 2
            self.register_buffer("qweight", paddle.zeros([rows, out_features], dtype="int8" if bits == 8 else "uint8"))
            self.register_buffer("weight_scale", paddle.zeros([out_features], dtype="float32"))
            self.a8 = a8
            if a8:
                self.register_buffer("act_scale", paddle.zeros([1], dtype="float32"))
            self.bias = self.create_parameter([out_features], is_bias=True) if has_bias else None

        def dequantized_weight(self):
            q = self.qweight if self.bits == 8 else unpack_int4(self.qweight, self.in_features)
            return q.astype("float32") * self.weight_scale

        def forward(self, x):
            if self.a8:
                x = fake_quant_activation(x, self.act_scale)
            return F.linear(x, self.dequantized_weight().astype(x.dtype), self.bias)

    return QuantLinear


def _act_hook(act_scale):
    def hook(layer, inputs):
        return (fake_quant_activation(inputs[0], act_scale),) + tuple(inputs[1:])

    return hook


def _set_sublayer(model, name: str, layer) -> None:
    parent = model
    *path, last = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, layer)


def wrapper_aliases(wrappers: Dict) -> set:
    """State-dict keys by which paddleslim's Shift/Smooth wrappers re-expose their inner layer's parameters."""
    out = {f"{n}.weight" for names in (wrappers or {}).values() for n in names}
    return out | {f"{n}.bias" for n in (wrappers or {}).get("ShiftSmoothHelpLayer", [])}


def rebuild_wrappers(model, wrappers: Dict, layers: Dict, tensors: Dict) -> None:
    """Give a freshly built model the structure Shift/Smooth left: paddleslim's wrapper layers where the quant
    config lists them, and a bias on every quantized Linear that the saved tensors give one (Shift adds them)."""
    import paddle

    if wrappers:
        from paddleslim.quant.advanced.utils_layers import ShiftSmoothHelpLayer, WOBiasHelpLayer

        subs = dict(model.named_sublayers())
        for cls in (ShiftSmoothHelpLayer, WOBiasHelpLayer):
            for name in wrappers.get(cls.__name__, []):
                _set_sublayer(model, name, cls(subs[name]))
    subs = dict(model.named_sublayers())
    for name in layers:
        layer = subs.get(name)
        if isinstance(layer, paddle.nn.Linear) and layer.bias is None and f"{name}.bias" in tensors:
            layer.bias = layer.create_parameter([layer.weight.shape[1]], is_bias=True)


def install(model, tensors: Dict, layers: Dict[str, Dict], runtime: str = "float32", wrappers: Optional[Dict] = None):
    """Put quantized weights into `model` (built from its config). `tensors`: name -> numpy array (the
    safetensors content); `layers`: linear name -> {"bits", "a8"}. runtime "float32": each Linear gets its
    dequantized weight (A8W8 also fake-quantizes its input); "int8": integer weights stay resident.
    The in-memory quantized model and a reloaded folder are built by this same function, so they agree exactly.
    `wrappers`: where Shift/Smooth put paddleslim's wrapper layers (already in `model`).
    Raises UserError naming missing or unexpected tensors."""
    import paddle

    QuantLinear = _quant_linear_class()
    subs = dict(model.named_sublayers())
    own_all, handled = set(), set(wrapper_aliases(wrappers))
    for name, spec in layers.items():
        old = subs.get(name)
        if type(old) is not paddle.nn.Linear:
            raise UserError(f"quantized layer {name!r} is not a Linear layer of this model; was the folder written for another model?")
        in_f, out_f = old.weight.shape
        ql = QuantLinear(in_f, out_f, int(spec["bits"]), old.bias is not None, bool(spec.get("a8")))
        own = {f"{name}.{k}" for k in ql.state_dict()}
        absent = sorted(own - set(tensors))
        if absent:
            raise UserError(f"quantized weights do not fit the model: missing {absent[:3]}")
        own_all |= own
        ql.set_state_dict({k[len(name) + 1:]: paddle.to_tensor(tensors[k]) for k in own})
        if runtime == "int8":
            _set_sublayer(model, name, ql)
            handled |= own
            parent = subs.get(name.rpartition(".")[0])
            if type(parent).__name__ == "ShiftSmoothHelpLayer":  # drop its aliases of the float weight and bias
                for attr in ("weight", "bias"):
                    if attr in parent._parameters:
                        del parent._parameters[attr]
        else:
            old.weight.set_value(ql.dequantized_weight())
            handled.add(f"{name}.weight")
            if old.bias is not None:
                old.bias.set_value(ql.bias)
                handled.add(f"{name}.bias")
            if ql.a8:
                old.register_forward_pre_hook(_act_hook(ql.act_scale))
    current = model.state_dict()
    state_keys = set(current)
    # every key is given (those install already set keep their value), so set_state_dict warns about none
    plain = {k: tensors[k] if k in tensors and k not in handled else current[k] for k in state_keys}
    missing = sorted(state_keys - set(tensors) - handled)
    unexpected = sorted(set(tensors) - state_keys - own_all)
    if missing or unexpected:
        raise UserError(f"quantized weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.set_state_dict({k: v if isinstance(v, paddle.Tensor) else paddle.to_tensor(v) for k, v in plain.items()})
    return model


# --------------------------------------------------------------------------- loading
def load_quantized_model(family, path: str, runtime: str = "float32"):
    """Build the family's model from `path`'s config and fill it from quant_model.safetensors (see `install`)."""
    import logging

    import paddle
    from safetensors.numpy import load_file

    if runtime not in RUNTIMES:
        raise UserError(f"--quant_runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    cfg = read_config(path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise UserError(f"{path}: {CONFIG_FILE} but no {WEIGHTS_FILE}; the quantized folder is incomplete")
    config = family.paddlenlp_class("config_class").from_pretrained(path)
    with paddle.utils.unique_name.guard():
        model = family.paddlenlp_class("model_class")(config)
    tensors = load_file(weights)
    rebuild_wrappers(model, cfg.get("wrappers"), cfg["layers"], tensors)
    install(model, tensors, cfg["layers"], runtime, cfg.get("wrappers"))
    model.eval()
    log = logging.getLogger("paddlellm")
    if runtime == "int8":
        log.info(f"quantized model ({cfg['quant_type']}): integer weights stay resident and are dequantized per layer at each forward")
    else:
        log.info(f"quantized model ({cfg['quant_type']}): weights dequantized to float32 for compute "
                 f"(--quant_runtime int8 keeps them as integers: less memory)")
    return model


def resident_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (what --quant_runtime int8 saves)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += int(t.numel()) * t.element_size()
    return total
