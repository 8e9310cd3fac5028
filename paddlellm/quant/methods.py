"""The quantization math: PTQ with paddle.quantization + paddleslim observers, GPTQ with paddleslim,
and the two small workarounds they need on paddle 3.3.1 CPU. Results are integer codes + scales
(numpy), which storage.install turns into a model and `paddlellm quant` saves."""
from __future__ import annotations

import contextlib
import io
import logging
import random
from typing import Dict, List, Tuple

import numpy as np

from ..arguments import UserError
from ..formats.quantized import pack_int4, qmax

log = logging.getLogger("paddlellm")


# --------------------------------------------------------------------------- calibration batches
def calibration_batches(family, examples, pad_id: int, batch_size: int, steps: int, seed: int) -> List[Dict]:
    """`steps` shuffled batches of `batch_size` examples as model inputs (paddle tensors, no labels)."""
    import paddle

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = []
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        if not idx:
            break
        arrays = family.build_batch([[examples[i]] for i in idx], pad_id)
        batches.append({k: paddle.to_tensor(v) for k, v in arrays.items() if k != "labels"})
    return batches


def run_batches(model, batches) -> None:
    import paddle

    with paddle.no_grad():
        for b in batches:
            model(**b)


def linear_names(model) -> List[str]:
    """Every plain nn.Linear, as PaddleNLP quantized them (LM heads are family classes and stay float)."""
    import paddle

    return [n for n, layer in model.named_sublayers() if type(layer) is paddle.nn.Linear]


def set_sublayer(model, name: str, layer) -> None:
    parent = model
    *path, last = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, layer)


# --------------------------------------------------------------------------- codes
def channel_absmax(w: np.ndarray) -> np.ndarray:
    """Per-output-channel abs-max of a [in, out] weight; 0 becomes 1e-8 as in paddleslim's compute_scales."""
    a = np.abs(w).max(axis=0).astype(np.float32)
    return np.where(a == 0, np.float32(1e-8), a)


def codes(w: np.ndarray, scale: np.ndarray, bits: int, low: int) -> np.ndarray:
    """round(w / scale) clipped to [low, qmax] as int8."""
    return np.clip(np.round(w / scale), low, qmax(bits)).astype(np.int8)


def layer_tensors(name: str, q: np.ndarray, scale: np.ndarray, bits: int, bias, act_absmax=None) -> Dict[str, np.ndarray]:
    out = {f"{name}.qweight": q if bits == 8 else pack_int4(q), f"{name}.weight_scale": scale.astype(np.float32)}
    if bias is not None:
        out[f"{name}.bias"] = bias.numpy().astype(np.float32)
    if act_absmax is not None:
        out[f"{name}.act_scale"] = np.array([act_absmax], dtype=np.float32)
    return out


class Result:
    """Integer codes and scales of every quantized Linear, plus PaddleNLP-format scale dumps."""

    def __init__(self):
        self.tensors: Dict[str, np.ndarray] = {}
        self.layers: Dict[str, Dict] = {}
        self.weight_scales: Dict[str, List[float]] = {}
        self.act_scales: Dict[str, float] = {}

    def add(self, name: str, q, scale, bits: int, bias, absmax, act_absmax=None) -> None:
        self.tensors.update(layer_tensors(name, q, scale, bits, bias, act_absmax))
        self.layers[name] = {"bits": bits, "a8": act_absmax is not None}
        self.weight_scales[f"{name}.weight_quanter"] = [float(v) for v in absmax]
        if act_absmax is not None:
            self.act_scales[f"{name}.activation_quanter"] = float(act_absmax)

    def full_tensors(self, model) -> Dict[str, np.ndarray]:
        """Codes + every other tensor of the (float) model, ready for storage.install / safetensors.
        Shift/Smooth's wrapper layers re-expose their inner layer's weight (and bias): those aliases are not stored."""
        from ..formats.quantized import wrapper_aliases

        out = dict(self.tensors)
        aliases = wrapper_aliases(wrappers_of(model))
        for k, v in model.state_dict().items():
            owner, _, leaf = k.rpartition(".")
            if (owner in self.layers and leaf in ("weight", "bias")) or k in aliases:
                continue
            a = v.numpy()
            out[k] = a.astype(np.float32) if a.dtype.kind == "f" else a
        return out


# --------------------------------------------------------------------------- PTQ
def ptq(model, batches, bits: int, a8: bool, bar) -> Result:
    """PaddleNLP's apply_ptq: paddle.quantization.PTQ with paddleslim's AVGObserver (A8W8 activations) and
    AbsMaxChannelWiseWeightObserver; the observers give the abs-max scales, the codes are round-to-nearest."""
    import paddle
    from paddle.quantization import PTQ, QuantConfig
    from paddleslim.quant.observers import AbsMaxChannelWiseWeightObserver, AVGObserver

    names = linear_names(model)
    originals = {n: layer for n, layer in model.named_sublayers() if n in set(names)}
    cfg = QuantConfig(activation=None, weight=None)
    cfg.add_type_config(paddle.nn.Linear, activation=AVGObserver(quant_bits=8) if a8 else None,
                        weight=AbsMaxChannelWiseWeightObserver(quant_bits=bits))
    PTQ(cfg).quantize(model, inplace=True)
    for b in batches:
        run_batches(model, [b])
        bar.update(1)
    subs = dict(model.named_sublayers())
    result = Result()
    for n in names:
        quanted = subs[n]
        absmax = np.asarray(quanted.weight_quanter.scales().numpy(), dtype=np.float32).reshape([-1])
        absmax = np.where(absmax == 0, np.float32(1e-8), absmax)
        act = None
        if a8:
            act = float(np.asarray(quanted.activation_quanter.scales().numpy()).reshape([-1])[0])
        set_sublayer(model, n, originals[n])  # back to the float Linear; storage.install quantizes it
        w = originals[n].weight.numpy()
        scale = (absmax / np.float32(qmax(bits))).astype(np.float32)
        result.add(n, codes(w, scale, bits, -qmax(bits)), scale, bits, originals[n].bias, absmax, act)
    return result


# --------------------------------------------------------------------------- GPTQ
@contextlib.contextmanager
def empty_index_assignment_is_noop():
    """Workaround, paddle 3.3.1 (fixed upstream by Paddle PR #79586): `t[empty_int_index] = v` raises
    "The pointer p_index is nullptr" instead of doing nothing. paddleslim's GPTQ.fasterquant assigns
    through the (usually empty) index of dead Hessian columns, so every layer failed. Patched only
    while GPTQ runs, and only when this paddle has the bug."""
    import paddle

    probe = paddle.zeros([2])
    try:
        probe[paddle.to_tensor([], dtype="int64")] = 1.0
        yield  # fixed paddle: nothing to patch
        return
    except ValueError:
        pass
    original = paddle.Tensor.__setitem__

    def empty(index) -> bool:
        if isinstance(index, paddle.Tensor):
            return index.dtype in (paddle.int32, paddle.int64) and int(index.numel()) == 0
        return isinstance(index, (tuple, list)) and any(empty(i) for i in index)

    def setitem(self, index, value):
        if empty(index):
            return None
        return original(self, index, value)

    paddle.Tensor.__setitem__ = setitem
    try:
        yield
    finally:
        paddle.Tensor.__setitem__ = original


class _GroupDone(Exception):
    """Raised after the last layer of a calibration group ran: the rest of that forward is not needed."""


def input_groups(model, batch, names: List[str]) -> List[List[str]]:
    """The Linear layers in call order, grouped when consecutive layers read the same input tensor (q/k/v,
    gate/up). Found generically from one forward (inputs are kept alive so their ids can't be reused).
    Layers never called, or called more than once per forward, each get a group of their own."""
    subs = dict(model.named_sublayers())
    calls, keep = [], []

    def record(name):
        def hook(layer, inputs):
            calls.append((name, id(inputs[0])))
            keep.append(inputs[0])
        return hook

    handles = [subs[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        run_batches(model, [batch])
    finally:
        for h in handles:
            h.remove()
    counts = {n: sum(1 for c, _ in calls if c == n) for n in names}
    groups, last_input = [], None
    for n, ident in calls:
        if counts[n] != 1:
            continue
        if groups and ident == last_input:
            groups[-1].append(n)
        else:
            groups.append([n])
        last_input = ident
    return groups + [[n] for n in names if counts[n] != 1]


def gptq(model, batches, bits: int, percdamp: float, actorder: bool, bar, retries: int = 2, grouped: bool = True) -> Result:
    """paddleslim GPTQ on every Linear in call order (PaddleNLP's apply_gptq): each layer collects its Hessian over
    the calibration batches, then fasterquant rounds it column by column. A layer whose Cholesky factorisation
    fails is retried with 10x the damping (up to `retries` times) before giving up with its name.

    grouped: layers that read the same input (q/k/v, gate/up) collect their Hessians in the same calibration
    forwards, and each forward stops once the group has run. The Hessians are the same as layer by layer
    (a layer's input never depends on a layer of its own group), so the result is identical, with about a third
    of the forwards, most of them partial. grouped=False is PaddleNLP's loop (one set of full forwards per layer)."""
    from paddleslim.quant.advanced import GPTQ

    result = Result()
    subs = dict(model.named_sublayers())
    names = linear_names(model)
    groups = input_groups(model, batches[0], names) if grouped else [[n] for n in names]
    for group in groups:
        wrappers = {n: GPTQ(subs[n], quant_bits=bits) for n in group}
        originals = {n: subs[n].weight.numpy().copy() for n in group}
        for n, w in wrappers.items():
            set_sublayer(model, n, w)
        stop = wrappers[group[-1]].register_forward_post_hook(_raise_group_done) if grouped and len(groups) > 1 else None
        for b in batches:
            try:
                run_batches(model, [b])
            except _GroupDone:
                pass
        if stop is not None:
            stop.remove()
        for n in group:
            _fasterquant(n, wrappers[n], subs[n], originals[n], percdamp, actorder, retries)
            set_sublayer(model, n, subs[n])
            absmax = channel_absmax(originals[n])
            scale = (absmax / np.float32(qmax(bits))).astype(np.float32)
            # fasterquant wrote q * scale back; the codes are recovered exactly (its grid is [-2^(b-1), 2^(b-1)-1])
            result.add(n, codes(subs[n].weight.numpy(), scale, bits, -qmax(bits) - 1), scale, bits, subs[n].bias, absmax)
            bar.update(1)
    result.layers = {n: result.layers[n] for n in names}  # model order, whatever the call order
    return result


def _raise_group_done(layer, inputs, output):
    raise _GroupDone()


def _fasterquant(name, wrapper, layer, w0, percdamp, actorder, retries) -> None:
    hessian = wrapper.hessian.clone()
    damp = percdamp
    for attempt in range(retries + 1):
        try:
            with empty_index_assignment_is_noop(), contextlib.redirect_stdout(io.StringIO()) as printed:
                wrapper.fasterquant(percdamp=damp, groupsize=-1, actorder=actorder)
            log.debug(printed.getvalue().strip())
            return
        except (RuntimeError, ValueError, OSError) as e:
            if attempt == retries:
                raise UserError(f"GPTQ failed on layer {name} even with percdamp {damp:g} ({str(e).strip().splitlines()[0][:120]}); "
                                f"use more calibration data (gptq_step) or a larger gptq_percdamp") from None
            damp *= 10
            log.warning(f"GPTQ: layer {name}: factorisation failed; retrying with percdamp {damp:g}")
            layer.weight.set_value(w0)
            wrapper.hessian = hessian.clone()


def rtn(model, bits: int) -> Result:
    """Round-to-nearest with per-channel abs-max scales (no calibration): the baseline GPTQ is measured against."""
    result = Result()
    subs = dict(model.named_sublayers())
    for n in linear_names(model):
        w = subs[n].weight.numpy()
        absmax = channel_absmax(w)
        scale = (absmax / np.float32(qmax(bits))).astype(np.float32)
        result.add(n, codes(w, scale, bits, -qmax(bits)), scale, bits, subs[n].bias, absmax)
    return result


def count_params(result: Result) -> Tuple[int, int]:
    """(quantized parameters, bytes of their codes)."""
    n = b = 0
    for k, v in result.tensors.items():
        if k.endswith(".qweight"):
            b += v.nbytes
    for name, spec in result.layers.items():
        q = result.tensors[f"{name}.qweight"]
        n += q.shape[1] * (q.shape[0] if spec["bits"] == 8 else 2 * q.shape[0])
    return n, b


# --------------------------------------------------------------------------- Shift / Smooth
WRAPPERS = ("ShiftSmoothHelpLayer", "WOBiasHelpLayer")  # paddleslim's helper layers Shift/Smooth insert


@contextlib.contextmanager
def float16_computes_in_float32(active: bool = True):
    """Workaround, paddleslim 2.6.0: Smooth.update_weight and PieceWiseSearch.search cast activations and
    weights to float16, whose pow/matmul kernels paddle's CPU build does not have ("kernel ... float16 ...
    is not registered"). On CPU those casts are made float32 casts while Smooth updates its weights."""
    import paddle

    if not active:
        yield
        return
    original = paddle.Tensor.cast

    def cast(t, dtype):
        return original(t, "float32" if str(dtype).replace("paddle.", "") == "float16" else dtype)

    paddle.Tensor.cast = cast
    try:
        yield
    finally:
        paddle.Tensor.cast = original


@contextlib.contextmanager
def help_layer_keeps_linear_bias():
    """Workaround, paddleslim 2.6.0: ShiftSmoothHelpLayer sets `self.bias` only when the wrapped Linear has no
    bias, but Shift's convert_weight then adds to `self.bias`: AttributeError on models whose Linear layers have
    biases (Bloom with shift_all_linears). The wrapper is given the Linear's own bias, as it does otherwise."""
    from paddleslim.quant.advanced.utils_layers import ShiftSmoothHelpLayer

    original = ShiftSmoothHelpLayer.__init__

    def init(self, layer):
        original(self, layer)
        if "bias" not in self._parameters:
            self.bias = layer.bias

    ShiftSmoothHelpLayer.__init__ = init
    try:
        yield
    finally:
        ShiftSmoothHelpLayer.__init__ = original


def shift_smooth(model, pairing: Dict, batches, q, on_cpu: bool = True) -> None:
    """PaddleNLP's apply_shift / apply_smooth with paddleslim (before PTQ). Both re-parametrise the float model
    (its outputs stay the same) so that activations quantize better. They pair each norm with the Linear layers
    that read it by generated layer names, so the model must have been built inside unique_name.guard()."""
    from paddleslim.quant.advanced import EMASampler, MultiStepSampler, PieceWiseSearch, Shift, Smooth

    with contextlib.redirect_stdout(io.StringIO()) as printed, help_layer_keeps_linear_bias():
        if q.shift:
            shift = Shift(model=model, model_config=dict(pairing), shift_all_linears=q.shift_all_linears,
                          sample_function=EMASampler() if q.shift_sampler == "ema" else None)
            run_batches(model, batches[: q.shift_step])
            shift.update_weight()
        if q.smooth:
            search = None
            if q.smooth_piecewise_search:
                search = PieceWiseSearch(k_piece=q.smooth_k_piece, bits_length=8, search_piece=q.smooth_search_piece,
                                         search_alpha_min=0.2, search_alpha_max=0.8, search_scale_min=1.0, search_scale_max=5.0,
                                         weight_quant_method="abs_max_channel_wise", act_quant_method="avg")
            smooth = Smooth(model, dict(pairing), alpha=0.5, smooth_all_linears=q.smooth_all_linears,
                            sample_function=MultiStepSampler() if q.smooth_sampler == "multi_step" else None, search_function=search)
            run_batches(model, batches[: q.smooth_step])
            with float16_computes_in_float32(on_cpu):
                smooth.update_weight()
    log.debug(printed.getvalue().strip())


def wrappers_of(model) -> Dict[str, List[str]]:
    """Where Shift/Smooth wrapped layers: {"ShiftSmoothHelpLayer": [names], "WOBiasHelpLayer": [names]}."""
    out: Dict[str, List[str]] = {w: [] for w in WRAPPERS}
    for name, layer in model.named_sublayers():
        if type(layer).__name__ in WRAPPERS:
            out[type(layer).__name__].append(name)
    return out if any(out.values()) else {}
