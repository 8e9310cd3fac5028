"""Cheaper CPU formulations of paddlenlp model pieces, as small named patches of a model instance.

paddlenlp's models are written for GPUs, where RMSNorm, rotary embeddings and the loss run as fused
kernels. Paddle registers none of those for CPU, so there the models fall back to generic
elementwise code that costs more than the matmuls around it (a profile of one LLaMA training step:
`pow` and its backward in RMSNorm ~7%, the slice backward of `rotate_half` ~5%, the vocabulary
cross-entropy and lm_head over every prompt and padding position). Each patch here computes the
same values in fewer, cheaper CPU operations:

  llama_rms_norm, chatglm_v2_rms_norm, qwen2_rms_norm
                     RMSNorm as one autograd node with a hand-written backward, x*x instead of pow
  llama_rotary, qwen2_rotary
                     rotary embedding without slices: q*cos + roll(q, d/2)*sin_signed, where the
                     sign of rotate_half is folded into sin (-x2*s == x2*(-s) exactly)
  <family>_supervised_loss (llama, chatglm_v2, gpt, opt, bloom, chatglm, glm, qwen2)
                     in training with labels, the lm_head and cross-entropy run on the
                     supervised positions only (prompt and padding positions add exactly 0 to the
                     loss and its gradient); the training forward then returns logits=None, as
                     paddlenlp's own fused-loss path does. Tied heads (GPT, OPT, Bloom, ChatGLM v1,
                     GLM, Qwen2) are the same product with the embedding matrix; GLM keeps its
                     loss_mask weighting
  llama_segment_attention, qwen2_segment_attention, gpt_segment_attention, opt_segment_attention,
  bloom_segment_attention, chatglm_segment_attention, glm_segment_attention, chatglm_v2_segment_attention
                     attention computed per block of the mask instead of over the whole [seq, seq]
                     square: a packed row of 512 tokens holding seven examples attends within each
                     example (causal blocks; in the prefix-LM families ChatGLM v1 and GLM a rectangle
                     for the bidirectional prompt and a "prefix" block for the targets, which attend
                     the prompt and themselves causally), padding tails attend their fixed key range, and positions
                     that attend only themselves take their value row as it is (softmax of one score is
                     exactly 1); the masked entries the full product computes add exactly 0 (GPT masks
                     with -1e4, whose exp() is 0 in float32 too; Bloom adds the ALiBi bias of each block's
                     keys). Attention dropout in training, attention
                     weights asked for, a cache or an irregular mask take paddlenlp's path
  linear_bias_grad (gpt, opt, bloom, chatglm, glm, qwen2, chatglm_v2)
                     a plain nn.Linear's trainable bias is added by one autograd node whose backward sums the
                     gradient over the rows as one product with a row of ones: autograd's add backward used
                     paddle's CPU reduce over leading axes (~70x slower; 18% of a Bloom SFT step). RMSNorm's
                     weight gradient is summed the same way (_row_sum)
  chatglm_generation_inputs
                     ChatGLM v1's prepare_inputs_for_generation scans every row for [MASK]/[gMASK] with
                     Python-level `in` on a tensor at every decode step (45% of a step), only to build
                     positions that are not used when position_ids are given, as they always are here;
                     with position_ids it returns the same inputs without the scan
  <family>_last_logits (llama, gpt, opt, bloom, chatglm, glm, qwen2)
                     while generating (inside `generating()`), the lm_head runs on the last position
                     only: generation reads nothing else, and over a long prompt the [prompt, vocab]
                     product was a quarter of the prefill's work (ChatGLM2 does this itself with
                     return_last_logit)

One more switch is not a patch but a paddle flag, for every family (`dense_views`): while a training
step, an evaluation forward or a generation runs on the CPU, paddle's stride kernels are off, so a
transpose or slice yields a dense tensor made by its own kernel instead of a strided view that the next
matmul or reshape copies element by element (paddle's CPU strided copy is slow).

A family lists the patches it takes in `Family.cpu_patches`; `apply(family, model)` patches a model
built for training (finetune) or loaded for inference (loading.load_for_inference: predict, serve, evaluation). Patches are on only when paddle runs on the CPU (GPU users keep paddlenlp's
fused kernels), and PADDLELLM_CPU_KERNELS=0 turns them off. Patched models give the same logits,
loss and gradients within float rounding (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import types
from typing import Callable, Dict, List, Optional

# Decoding in chunks (the dynamic decode runners, families/decode_core.py, and the in-place static runner,
# formats/static.py): prompts run grouped by length, so the padding of a mixed-length batch is not computed.
PREFILL_ROWS = 8  # most rows per prefill chunk: rows are grouped by prompt length, each chunk runs over its own longest
PREFILL_FILL = 0.75  # a row joins the current chunk only if it is at least this share of the chunk's longest prompt


def prefill_chunks(lengths) -> list:
    """Row indices grouped for the prefill, longest prompts first: a chunk takes at most PREFILL_ROWS rows,
    each at least PREFILL_FILL of its first (longest) row's length, so little padding is computed."""
    import numpy as np

    lengths = np.asarray(lengths)
    chunks: list = []
    for row in np.argsort(-lengths, kind="stable"):
        if chunks and len(chunks[-1]) < PREFILL_ROWS and lengths[row] >= PREFILL_FILL * lengths[chunks[-1][0]]:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return [np.array(c) for c in chunks]


DISABLE_VAR = "PADDLELLM_CPU_KERNELS"
_OFF_VALUES = {"0", "false", "off", "no"}
IGNORE = -100

log = logging.getLogger("paddlellm")
_state = threading.local()  # .active: a patched model's forward is running in this thread


def wanted() -> bool:
    """True when the patches should be applied: paddle runs on the CPU and they are not switched off."""
    if os.environ.get(DISABLE_VAR, "").strip().lower() in _OFF_VALUES:
        return False
    import paddle

    return paddle.device.get_device() == "cpu"


def apply(family, model, force: bool = False):
    """Apply `family.cpu_patches` to `model` (before LoRA/prefix wrapping) when `wanted()`, logging one line.

    force=True applies them whatever the device and switch (tests compare patched and unpatched models).
    Returns the model (patched in place).
    """
    names = list(getattr(family, "cpu_patches", ()) or ())
    if not names or not (force or wanted()):
        return model
    done = [name for name in names if PATCHES[name](model)]
    if done and not force:
        log.info(f"CPU kernels on for {family.name}: {', '.join(done)} (same results, cheaper on CPU); "
                 f"set {DISABLE_VAR}=0 to turn them off")
    return model


def apply_export(family, model):
    """Apply `family.export_patches` (a subset of its cpu_patches that also holds in a traced static program) to the
    model a step program is exported from, whatever the device and switch: the program then computes what the
    dynamic runner computes on CPU (RMSNorm as x*x: paddle's pow kernel took ~3 ms of a batch-32 LLaMA step)."""
    for name in getattr(family, "export_patches", ()) or ():
        PATCHES[name](model)
    return model


STRIDE_FLAG = "FLAGS_use_stride_kernel"
_views_logged = False


@contextlib.contextmanager
def generating():
    """The context of a generation loop: `dense_views()`, and patched models (llama_last_logits) return the
    logits of the last position only (what greedy search, sampling and the decode loop read)."""
    before = getattr(_state, "last_only", False)
    _state.last_only = True
    try:
        with dense_views():
            yield
    finally:
        _state.last_only = before


@contextlib.contextmanager
def dense_views():
    """Run the block with paddle's stride kernels off when `wanted()` (the flag is restored afterwards).

    Workaround (paddle 3.3 CPU): with stride kernels on, `transpose`/`slice` return strided views and the
    op that consumes one (matmul, reshape, concat) first makes it contiguous through paddle's generic
    strided-copy kernel, which on CPU is far slower than the dense transpose kernel. paddlenlp's attention
    transposes q, k, v and the KV cache every layer, so on the 2-core machine a LLaMA decode step at
    batch 32 x 300 cached tokens took ~190 ms with views and ~65 ms without, batch 8 ~19 ms against ~9 ms,
    and a training step 15-25% less (bench/README_generate.md, bench/README_train.md). The values are the
    same either way: only where the data sit changes. Not process-wide, because some readers need the
    strided kernels (safetensors' paddle reader goes through `view_dtype`, registered only for strided
    tensors); scoped to the model's forward/backward and generation loops.
    """
    if not wanted():
        yield
        return
    import paddle

    global _views_logged
    if not _views_logged:
        _views_logged = True
        log.info(f"CPU: paddle's stride kernels off while the model runs (same values, cheaper on CPU); "
                 f"set {DISABLE_VAR}=0 to keep them")
    before = paddle.get_flags([STRIDE_FLAG])[STRIDE_FLAG]
    paddle.set_flags({STRIDE_FLAG: False})
    try:
        yield
    finally:
        paddle.set_flags({STRIDE_FLAG: before})


# ------------------------------------------------------------------ helpers
def _active() -> bool:
    return getattr(_state, "active", False)


def _replace_forward(layer, make: Callable) -> None:
    """Replace one instance's forward by make(current), where current(self, ...) is the forward it had (the
    class's, or an earlier instance patch such as families.base.with_supervised_token_mean_loss). Keeps the
    class forward's signature (PrefixModelForCausalLM and the Trainer inspect it); bound with MethodType,
    so a deepcopy of the layer is bound to the copy."""
    current = getattr(layer.forward, "__func__", type(layer).forward)
    fn = make(current)
    fn.__signature__ = inspect.signature(type(layer).forward)
    layer.forward = types.MethodType(fn, layer)


def _mark_active(layer) -> None:
    """While `layer`'s forward runs, module-level patches (rotary) take their patched path.

    Module-level functions cannot tell which model calls them; the flag limits them to patched models. When
    the forward ends, the tables its layers shared (rotary, the attention mask's blocks) are dropped.
    """
    if getattr(layer, "_paddlellm_active", False):
        return
    # the function behind the current forward (it may be an instance patch), called with `self`, so that a
    # deepcopy of the layer (MethodType rebinds to the copy) runs on the copy
    current = getattr(layer.forward, "__func__", type(layer).forward)

    def forward(self, *args, **kwargs):
        before = _active()
        _state.active = True
        try:
            return current(self, *args, **kwargs)
        finally:
            _state.active = before
            if not before:  # the outermost patched forward ends: drop what its layers shared
                _state.rotary = _state.groups = None

    forward.__signature__ = inspect.signature(type(layer).forward)
    layer.forward = types.MethodType(forward, layer)
    layer._paddlellm_active = True


def _row_sum(t):
    """t [..., h] summed over every axis but the last -> [h], as one BLAS product with a row of ones: paddle's CPU
    reduce over leading axes measured 18 ms for a [1600, 2048] gradient at two threads, the product 0.24 ms (the
    same sum up to float rounding: summation order)."""
    import paddle

    flat = t.reshape([-1, t.shape[-1]])
    return paddle.matmul(paddle.ones([1, flat.shape[0]], dtype=t.dtype), flat).reshape([t.shape[-1]])


# ------------------------------------------------------------------ bias gradients
def _bias_add_class():
    import paddle  # noqa: F401
    from paddle.autograd import PyLayer

    class BiasAdd(PyLayer):
        """x + bias (bias [h] over x [..., h]) whose backward gives the bias gradient as _row_sum(dy): autograd's add
        backward reduces dy over the leading axes with paddle's CPU reduce (37.8 ms forward + backward at [1600, 2048],
        against under 1 ms this way); 18% of a Bloom bench-shape SFT step."""

        @staticmethod
        def forward(ctx, x, bias):
            ctx.x_grad = not x.stop_gradient
            return x + bias

        @staticmethod
        def backward(ctx, dy):
            return (dy if ctx.x_grad else None), _row_sum(dy)

    return BiasAdd


def _patch_linear_bias_grad(model) -> int:
    """Every plain paddle.nn.Linear with a trainable float32 bias adds it through BiasAdd while gradients are recorded
    (the same matmul(x, W) + b as F.linear); anything else (no bias, a frozen one as under LoRA, no_grad, other dtypes,
    LoRA and quantized layers, which are not nn.Linear itself) runs the class forward."""
    import paddle

    fn = _bias_add_class()

    def make(previous):
        def forward(self, input):
            bias = self.bias
            if (bias is None or bias.stop_gradient or input.dtype != paddle.float32 or not paddle.is_grad_enabled()
                    or not paddle.in_dynamic_mode()):
                return previous(self, input)
            return fn.apply(paddle.matmul(input, self.weight), bias)
        return forward

    n = 0
    for layer in model.sublayers(include_self=True):
        if type(layer) is paddle.nn.Linear and layer.bias is not None:
            _replace_forward(layer, make)
            n += 1
    return 1 if n else 0


# ------------------------------------------------------------------ RMSNorm
def _rms_norm_layer_class():
    import paddle
    from paddle.autograd import PyLayer

    class RMSNormFunction(PyLayer):
        """y = x * rsqrt(mean(x*x) + eps) * w over the last axis, with the backward written out:
        dx = r * (g*w - xr * mean(g*w*xr)), dw = sum over rows of g * xr (r = rsqrt(..), xr = x*r).
        Autograd of the same expression runs pow, broadcast-multiply backwards and their reductions."""

        @staticmethod
        def forward(ctx, x, w, eps):
            r = paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps)
            xr = x * r
            ctx.save_for_backward(w, r, xr)
            ctx.w_grad = not w.stop_gradient
            return xr * w

        @staticmethod
        def backward(ctx, dy):
            w, r, xr = ctx.saved_tensor()
            gw = dy * w
            dx = r * (gw - xr * (gw * xr).mean(-1, keepdim=True))
            dw = _row_sum(dy * xr) if ctx.w_grad else None
            return dx, dw

    return RMSNormFunction


def _patch_rms_norm(model, layer_class, eps_attr: str) -> int:
    """Every `layer_class` RMSNorm of the model computes through RMSNormFunction (float32 only; other dtypes
    keep the class forward, which upcasts)."""
    import paddle

    fn = _rms_norm_layer_class()

    def make(previous):
        def forward(self, hidden_states):
            if hidden_states.dtype != paddle.float32 or self.weight.dtype != paddle.float32:
                return previous(self, hidden_states)
            if not paddle.in_dynamic_mode():  # traced into a static program (apply_export): the same forward, no PyLayer
                x = hidden_states
                return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + getattr(self, eps_attr)) * self.weight
            return fn.apply(hidden_states, self.weight, getattr(self, eps_attr))
        return forward

    n = 0
    for layer in model.sublayers(include_self=True):
        config = getattr(layer, "config", None)
        if isinstance(layer, layer_class) and not getattr(config, "use_fused_rms_norm", False):
            _replace_forward(layer, make)
            n += 1
    return n


def _patch_llama_rms_norm(model) -> int:
    from paddlenlp.transformers.llama.modeling import LlamaRMSNorm

    return _patch_rms_norm(model, LlamaRMSNorm, "variance_epsilon")


def _patch_qwen2_rms_norm(model) -> int:
    from paddlenlp.transformers.qwen2.modeling import Qwen2RMSNorm

    return _patch_rms_norm(model, Qwen2RMSNorm, "variance_epsilon")


def _patch_chatglm_v2_rms_norm(model) -> int:
    from paddlenlp.transformers.chatglm_v2.modeling import RMSNorm

    return _patch_rms_norm(model, RMSNorm, "epsilon")


# ------------------------------------------------------------------ rotary embedding
_original_rotary: Dict[str, Callable] = {}  # paddlenlp modeling module -> its own apply_rotary_pos_emb


def _rotary(module: str) -> Callable:
    """The patched apply_rotary_pos_emb of one paddlenlp modeling module (LLaMA's, Qwen2's: the same function)."""

    def apply(q, k, cos, sin, position_ids):
        """paddlenlp's apply_rotary_pos_emb, with rotate_half(x) * sin computed as roll(x, d/2) * sin_signed, and the
        cos/sin tables gathered at the positions and tiled over the heads once per forward (every layer gets the
        same position_ids tensor): paddle's CPU multiply is several times slower when it broadcasts [.., 1, d]
        over the heads than on same-shape operands, forward and backward. The tables are kept for the layers of
        one forward only, so another model (another rotary base) never reads them."""
        import paddle

        if not _active() or position_ids is None:
            return _original_rotary[module](q, k, cos, sin, position_ids)
        cached = getattr(_state, "rotary", None)  # per forward: _mark_active clears it
        if cached is None or cached[0] is not position_ids or cached[1] != (q.shape, k.shape):
            c, s = rotary_tables(cos, sin, position_ids)
            tables = {heads: (paddle.tile(c, [1, 1, heads, 1]), paddle.tile(s, [1, 1, heads, 1])) for heads in {q.shape[2], k.shape[2]}}
            cached = (position_ids, (q.shape, k.shape), tables)
            _state.rotary = cached
        tables = cached[2]
        return rotate(q, *tables[q.shape[2]]), rotate(k, *tables[k.shape[2]])

    return apply


def rotary_tables(cos, sin, position_ids):
    """LLaMA's [1, seq, 1, d] cos/sin tables gathered at position_ids [bs, seq_len] -> [bs, seq_len, 1, d] each, with
    the sign of rotate_half folded into sin: rotate_half(x) = [-x2, x1] = roll(x, d/2) * [-1.., +1..], and
    -x2*s == x2*(-s) exactly. (Also the LLaMA decode runner's.)"""
    import paddle

    d = sin.shape[-1]
    half = d // 2
    sign = paddle.concat([paddle.full([half], -1.0, sin.dtype), paddle.full([d - half], 1.0, sin.dtype)])
    c = cos.squeeze(axis=[0, 2])[position_ids].unsqueeze(2)
    s = (sin.squeeze(axis=[0, 2]) * sign)[position_ids].unsqueeze(2)
    return c, s


def rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin, with sin from rotary_tables (sign folded in)."""
    import paddle

    return x * cos + paddle.roll(x, x.shape[-1] // 2, axis=-1) * sin


def _patch_rotary(model, module: str, inner_name: str) -> int:
    import importlib

    modeling = importlib.import_module(f"paddlenlp.transformers.{module}.modeling")
    inner = getattr(model, inner_name, None)
    if inner is None or not getattr(model.config, "rope", True) or getattr(model.config, "use_fused_rope", False):
        return 0
    if module not in _original_rotary:
        _original_rotary[module] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = _rotary(module)  # looked up by the attention's forward at call time
    _mark_active(inner)
    return 1


def _patch_llama_rotary(model) -> int:
    return _patch_rotary(model, "llama", "llama")


def _patch_qwen2_rotary(model) -> int:
    return _patch_rotary(model, "qwen2", "qwen2")


def _hidden_of(outputs):
    """The decoder's last hidden states from its outputs: a bare tensor (GPT/OPT without cache or return_dict), a
    tuple or a ModelOutput (first entry)."""
    import paddle

    return outputs if isinstance(outputs, paddle.Tensor) else outputs[0]


def _rest_of(outputs):
    """What a causal LM returns after (loss, logits) without return_dict: the decoder's outputs after the hidden
    states; None when the decoder returned a bare tensor (GPT and OPT then return the bare logits, or (loss, logits))."""
    import paddle

    return None if isinstance(outputs, paddle.Tensor) else tuple(outputs[1:])


def _lm_output(output_cls, return_dict: bool, outputs, loss, logits, rest: Callable = _rest_of):
    """A causal LM's output from its decoder's `outputs`, as paddlenlp's forwards build it: output_cls(...), or
    without return_dict the tuple (loss, logits, *rest(outputs)), loss left out when there is none."""
    if not return_dict:
        more = rest(outputs)
        if more is None:
            return (loss, logits) if loss is not None else logits
        return ((loss, logits) if loss is not None else (logits,)) + more
    fields = {k: getattr(outputs, k, None) for k in ("past_key_values", "hidden_states", "attentions")}
    return output_cls(loss=loss, logits=logits, **{k: v for k, v in fields.items() if k in output_cls.__dataclass_fields__})


def _return_dict(self, sig, a, none_means_tuple: bool) -> bool:
    """The forward's return_dict as the model's own forward resolves it: None means the config's use_return_dict, or
    a tuple for forwards that test `if return_dict:` (ChatGLM v1, GLM)."""
    rd = a["return_dict"] if "return_dict" in a else sig.parameters["return_dict"].default
    if rd is None:
        return False if none_means_tuple else self.config.use_return_dict
    return bool(rd)


# ------------------------------------------------------------------ loss on supervised positions only
def _patch_supervised_loss(model, backbone: Callable, head: Callable, output_class: str, fallback_args=(),
                           seq_first: bool = False, rest: Callable = _rest_of, none_means_tuple: bool = False,
                           fallback: Callable = None, weight_arg: str = None) -> int:
    """In training with labels: the output head and cross-entropy on the supervised positions only.

    backbone(model, arguments, return_dict) runs the model's decoder: its hidden states (_hidden_of) are
    [batch, seq, h], or [seq, batch, h] when seq_first (ChatGLM v1/v2); head(model) is the output projection,
    which takes hidden states in that layout. The loss is the mean over supervised tokens (labels != -100),
    which is what the trainer's token weighting assumes. (paddlenlp's LLaMA/GPT/Qwen2 criteria divide by the
    tokens whose loss is > 0, which differs only when a float32 token loss rounds to exactly 0; OPT and ChatGLM
    v1 divide by every position, which families.base.with_supervised_token_mean_loss rescales to this mean.)
    With weight_arg (GLM's loss_mask), the loss is sum(token loss * weight) / sum(weight) as that model computes
    it, over the positions of non-zero weight. Anything else (eval, no labels, tensor/sequence parallel, the
    arguments in fallback_args, fallback(model, arguments) true) runs the model's own forward.
    """
    import paddle
    import paddle.nn.functional as F
    from paddlenlp.transformers import model_outputs

    cfg = model.config
    sig = inspect.signature(type(model).forward)
    output_cls = getattr(model_outputs, output_class)

    def make(previous):
        def forward(self, *args, **kwargs):
            a = sig.bind(self, *args, **kwargs).arguments
            labels = a.get("labels")
            if (labels is None or not self.training or cfg.tensor_parallel_degree > 1
                    or getattr(cfg, "sequence_parallel", False) or getattr(cfg, "use_fused_linear_cross_entropy", False)
                    or any(a.get(k) for k in fallback_args) or (fallback is not None and fallback(self, a))):
                return previous(self, *args, **kwargs)
            order = (lambda t: t.transpose([1, 0])) if seq_first else (lambda t: t)  # to the order of hidden's rows
            flat = order(labels).flatten()
            weight = order(a[weight_arg].reshape(labels.shape)).flatten().astype("float32") if weight_arg else None
            keep = paddle.nonzero((weight != 0) if weight_arg else (flat != IGNORE)).flatten()
            if keep.shape[0] == 0:
                return previous(self, *args, **kwargs)
            return_dict = _return_dict(self, sig, a, none_means_tuple)
            outputs = backbone(self, a, return_dict)
            hidden = _hidden_of(outputs)
            picked = paddle.gather(hidden.reshape([-1, hidden.shape[-1]]), keep)  # [supervised, hidden]
            logits = head(self)(picked.unsqueeze(1 if seq_first else 0))  # one sequence of the supervised rows
            logits = logits.reshape([-1, logits.shape[-1]]).astype("float32")
            target = paddle.gather(flat, keep).unsqueeze(-1)
            if weight_arg:
                token_loss = F.cross_entropy(logits, target, reduction="none").flatten()
                loss = (token_loss * paddle.gather(weight, keep)).sum() / weight.sum()
            else:
                loss = F.cross_entropy(logits, target, reduction="sum") / keep.shape[0]
            return _lm_output(output_cls, return_dict, outputs, loss, None, rest)
        return forward

    _replace_forward(model, make)
    return 1


def _patch_llama_supervised_loss(model) -> int:
    return _patch_supervised_loss(model, _llama_backbone, lambda self: self.lm_head, "CausalLMOutputWithCrossAttentions",
                                  fallback_args=("attn_mask_startend_row_indices",))


def _patch_chatglm_v2_supervised_loss(model) -> int:
    def backbone(self, a, return_dict):
        use_cache = a.get("use_cache")
        return self.chatglm_v2(
            input_ids=a.get("input_ids"), position_ids=a.get("position_ids"), attention_mask=a.get("attention_mask"),
            past_key_values=a.get("past_key_values"), inputs_embeds=a.get("inputs_embeds"),
            use_cache=use_cache if use_cache is not None else self.config.use_cache,
            output_hidden_states=a.get("output_hidden_states"), return_dict=return_dict)

    return _patch_supervised_loss(model, backbone, lambda self: self.chatglm_v2.output_layer, "CausalLMOutputWithPast",
                                  fallback_args=("return_last_logit",), seq_first=True)


# the decoders of the other families, called as their ForCausalLM forwards call them (a = the bound arguments)
def _gpt_backbone(self, a, return_dict):
    return self.gpt(
        a.get("input_ids"), position_ids=a.get("position_ids"), attention_mask=a.get("attention_mask"),
        inputs_embeds=a.get("inputs_embeds"), use_cache=a.get("use_cache", False), past_key_values=a.get("past_key_values"),
        output_attentions=a.get("output_attentions") if a.get("output_attentions") is not None else self.config.output_attentions,
        output_hidden_states=a.get("output_hidden_states", False), return_dict=return_dict)


def _opt_backbone(self, a, return_dict):
    cfg = self.config
    return self.opt(
        a.get("input_ids"), attention_mask=a.get("attention_mask"), inputs_embeds=a.get("inputs_embeds"),
        use_cache=a.get("use_cache", False), cache=a.get("cache"),
        output_attentions=a.get("output_attentions") if a.get("output_attentions") is not None else cfg.output_attentions,
        output_hidden_states=(a.get("output_hidden_states") if a.get("output_hidden_states") is not None
                              else cfg.output_hidden_states), return_dict=return_dict)


def _bloom_backbone(self, a, return_dict):
    return self.bloom(
        a.get("input_ids"), past_key_values=a.get("cache"), attention_mask=a.get("attention_mask"),
        position_ids=a.get("position_ids"), head_mask=a.get("head_mask"), inputs_embeds=a.get("inputs_embeds"),
        use_cache=a.get("use_cache"), output_attentions=a.get("output_attentions"),
        output_hidden_states=a.get("output_hidden_states"), return_dict=return_dict)


def _bloom_head(self):
    return lambda hidden: self.lm_head(hidden, self.config.tensor_parallel_output)


def _chatglm_backbone(self, a, return_dict):
    return self.chatglm(
        input_ids=a.get("input_ids"), position_ids=a.get("position_ids"), attention_mask=a.get("attention_mask"),
        cache=a.get("cache"), inputs_embeds=a.get("inputs_embeds"), use_cache=a.get("use_cache"), return_dict=return_dict)


def _chatglm_rest(outputs) -> tuple:
    """ChatGLM v1 without return_dict returns (loss, logits, transformer_outputs[1:]): the rest as one nested tuple."""
    return (tuple(outputs[1:]),)


def _glm_backbone(self, a, return_dict):
    """GLMModel.forward up to its output head (GLMModel computes the logits itself when output_predict is set)."""
    import paddle

    glm, input_ids = self.glm, a.get("input_ids")
    position_ids, attention_mask = a.get("position_ids"), a.get("attention_mask")
    if position_ids is None:
        n = input_ids.shape[-1]
        position_ids = paddle.stack([paddle.arange(0, n, dtype="int64"), paddle.zeros([n], dtype="int64")], axis=0).unsqueeze(0)
    if attention_mask is None:
        attention_mask = paddle.zeros([input_ids.shape[0]])
    return glm.transformer(glm.word_embeddings(input_ids), position_ids, attention_mask, a.get("cache"), return_dict)


def _glm_head(self):
    import paddle.nn.functional as F

    return lambda hidden: F.linear(hidden, self.glm.word_embeddings.weight.T)  # as GLMModel (tied to the embeddings)


def _glm_fallback(self, a) -> bool:
    """GLM's own forward for label smoothing, or without a loss_mask (it then returns the unreduced token losses)."""
    return a.get("loss_mask") is None or getattr(self.config, "label_smoothing", 0) > 0


def _qwen2_backbone(self, a, return_dict):
    cfg = self.config
    return self.qwen2(
        input_ids=a.get("input_ids"), position_ids=a.get("position_ids"), attention_mask=a.get("attention_mask"),
        inputs_embeds=a.get("inputs_embeds"), use_cache=a.get("use_cache"), past_key_values=a.get("past_key_values"),
        output_attentions=a.get("output_attentions") if a.get("output_attentions") is not None else cfg.output_attentions,
        output_hidden_states=(a.get("output_hidden_states") if a.get("output_hidden_states") is not None
                              else cfg.output_hidden_states), return_dict=return_dict)


def _qwen2_head(self):
    return lambda hidden: self.lm_head(hidden, tensor_parallel_output=False)


# family -> (backbone, head, output class, keyword arguments of _patch_supervised_loss/_patch_last_logits)
_HEADS = {
    "gpt": (_gpt_backbone, lambda self: self.lm_head, "CausalLMOutputWithCrossAttentions", {}),
    "opt": (_opt_backbone, lambda self: self.lm_head, "CausalLMOutputWithCrossAttentions", {}),
    "bloom": (_bloom_backbone, _bloom_head, "CausalLMOutputWithCrossAttentions", {}),
    "chatglm": (_chatglm_backbone, lambda self: self.lm_head, "CausalLMOutputWithPast",
                {"seq_first": True, "rest": _chatglm_rest, "none_means_tuple": True}),
    "glm": (_glm_backbone, _glm_head, "CausalLMOutputWithCrossAttentions", {"none_means_tuple": True}),
    "qwen2": (_qwen2_backbone, _qwen2_head, "CausalLMOutputWithPast", {}),
}
_LOSS_ONLY = {"glm": {"fallback": _glm_fallback, "weight_arg": "loss_mask"},
              "qwen2": {"fallback_args": ("attn_mask_startend_row_indices",)}}
_LOGITS_ONLY = {"chatglm": {"after_head": lambda logits: logits.transpose([1, 0, 2]).astype("float32")}}


def _supervised_loss_patch(family: str) -> Callable:
    def patch(model) -> int:
        backbone, head, output_class, kw = _HEADS[family]
        return _patch_supervised_loss(model, backbone, head, output_class, **kw, **_LOSS_ONLY.get(family, {}))
    return patch


def _last_logits_patch(family: str) -> Callable:
    def patch(model) -> int:
        backbone, head, output_class, kw = _HEADS[family]
        return _patch_last_logits(model, backbone, head, output_class, **kw, **_LOGITS_ONLY.get(family, {}))
    return patch


# ------------------------------------------------------------------ attention per mask block
_MAX_GROUPS = 96  # more query groups than this in a row (an unusual mask): the full masked product is cheaper


# An additive mask entry at or below this blocks its key: exp(score - 1e4 - max) is exactly 0 in float32 for any score
# within ~9900 of the row's largest (GPT masks with -1e4, LLaMA/Qwen2/OPT with finfo.min, OPT's 2-D path with -inf).
_MASKED_AT = -1e4


def _query_groups(mask) -> Optional[list]:
    """Per row of a [B, 1, S, S] additive mask (0 = attend, <= -1e4 = not): a list of query groups
    (q0, q1, k0, k1, kind) that reproduce it, kind "causal" (queries q0..q1-1 attend keys q0..q), "rect" (every
    query attends keys k0..k1-1), "self" (each query attends only itself) or "prefix" (a prefix-LM target block,
    ChatGLM v1 / GLM: query q of q0..q1-1 attends keys k0..q, i.e. every key of the prompt k0..q0-1 and the targets
    causally; k1 = q1); None when the mask is not of that shape (or its values are not just 0 and <= -1e4)."""
    m = mask.numpy()
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[2] != m.shape[3]:
        return None
    m = m[:, 0]
    attend = m == 0
    if not (attend | (m <= _MASKED_AT)).all() or not attend.any(-1).all():
        return None
    S = m.shape[-1]
    first = attend.argmax(-1)
    last = S - 1 - attend[:, :, ::-1].argmax(-1)
    if not (attend.sum(-1) == last - first + 1).all():  # every query attends one contiguous key range
        return None
    rows = []
    for f, l in zip(first, last):
        groups, i = [], 0
        while i < S:
            j = i + 1
            if f[i] == i and l[i] == i:  # a causal block starts here (or a position attending only itself)
                while j < S and f[j] == i and l[j] == j:
                    j += 1
                if j - i == 1:
                    while j < S and f[j] == j and l[j] == j and (j + 1 >= S or f[j + 1] != j):
                        j += 1
                    groups.append((i, j, i, j, "self"))
                else:
                    groups.append((i, j, i, j, "causal"))
            elif f[i] < i == l[i] and j < S and f[j] == f[i] and l[j] == j:  # prefix-LM targets: keys f[i]..q
                while j < S and f[j] == f[i] and l[j] == j:
                    j += 1
                groups.append((i, j, int(f[i]), j, "prefix"))
            else:
                while j < S and f[j] == f[i] and l[j] == l[i]:
                    j += 1
                groups.append((i, j, int(f[i]), int(l[i]) + 1, "rect"))
            i = j
        if len(groups) > _MAX_GROUPS:
            return None
        rows.append(groups)
    return rows


_original_attention: Dict[str, Callable] = {}  # paddlenlp modeling module -> its scaled_dot_product_attention


def _mask_groups(attention_mask, bsz: int, as_4d: Optional[Callable] = None) -> Optional[list]:
    """The query groups of each of the bsz rows of the mask (_query_groups, of as_4d(mask) when given), analysed once
    per forward (the layers share the mask tensor); a single mask row stands for every row (GPT's causal-only mask).
    None when the mask has no such groups: callers check this before computing anything for the per-block path."""
    cached = getattr(_state, "groups", None)
    if cached is None or cached[0] is not attention_mask:
        cached = (attention_mask, _query_groups(as_4d(attention_mask) if as_4d is not None else attention_mask))
        _state.groups = cached
    groups = cached[1]
    if groups is not None and len(groups) == 1 < bsz:
        groups = groups * bsz
    return groups if groups is not None and len(groups) == bsz else None


def _per_block_attention(query_states, key_states, value_states, attention_mask, scale: Optional[float] = None,
                         bias: Optional[Callable] = None, as_4d: Optional[Callable] = None, seq_first: bool = False):
    """softmax(q k^T * scale + bias + mask) v for q/k/v [batch, seq, heads, head_dim] with as many key/value heads as
    query heads, an additive [batch, 1, seq, seq] mask (or
    any mask that as_4d(mask) turns into one: Bloom's [batch * heads, seq, seq], GLM's 0/1 mask) and scale
    1/sqrt(head_dim) unless given, computed per query group of the mask -> [batch, seq, heads * head_dim]; with
    seq_first, q/k/v are [seq, batch, heads, head_dim] and the result [seq, batch, heads * head_dim] (ChatGLM v1).
    bias(row, k0, k1) is a [1, heads, 1, k1 - k0] score bias of keys k0..k1-1 (Bloom's ALiBi). None when the mask
    has no such groups (the caller then runs the full product)."""
    import math

    import paddle
    import paddle.nn.functional as F

    if seq_first:
        q_len, bsz, heads, head_dim = query_states.shape
    else:
        bsz, q_len, heads, head_dim = query_states.shape
    groups = _mask_groups(attention_mask, bsz, as_4d)
    if groups is None:
        return None
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    masks = {}  # (prompt keys, queries) -> the additive [n, p + n] mask of a causal (p = 0) or prefix block

    def block_mask(p, n):
        if (p, n) not in masks:
            causal = paddle.tril(paddle.ones([n, n], dtype="bool"))
            attend = paddle.concat([paddle.ones([n, p], dtype="bool"), causal], axis=1) if p else causal
            masks[(p, n)] = paddle.where(attend, paddle.zeros([1]), paddle.full([1], paddle.finfo(paddle.float32).min))
        return masks[(p, n)]

    # one split per tensor (its backward is one concat) instead of a slice per block (each slice's backward
    # writes into a zero tensor of the whole input's size); seq_first rows [seq, 1, ...] are [1, seq, ...] as they lie
    axis = 1 if seq_first else 0
    q_rows, k_rows, v_rows = ((paddle.split(t, bsz, axis=axis) if bsz > 1 else [t]) for t in (query_states, key_states, value_states))
    if seq_first:
        q_rows, k_rows, v_rows = ([t.reshape([1, q_len, heads, head_dim]) for t in ts] for ts in (q_rows, k_rows, v_rows))
    to_heads = (lambda t: t.transpose([0, 2, 1, 3]))  # [1, n, heads, head_dim] <-> [1, heads, n, head_dim]
    rows = []
    for b, row_groups in enumerate(groups):
        q_parts = _split_seq(q_rows[b], [(q0, q1) for q0, q1, _, _, _ in row_groups], q_len)
        # the key spans a group reads: a prefix block reads its prompt's keys (those of the prompt's own rect group)
        # and its own; taken apart once, so that the spans of a packed row of prefix-LM examples tile it (one split)
        spans = [[(k0, q0), (q0, q1)] if kind == "prefix" else [(k0, k1)] for q0, q1, k0, k1, kind in row_groups]
        keys = sorted({s for group in spans for s in group})
        k_of, v_of = (dict(zip(keys, _split_seq(t[b], keys, q_len))) for t in (k_rows, v_rows))
        parts = []
        for (q0, q1, k0, k1, kind), q, group in zip(row_groups, q_parts, spans):
            if kind == "self":  # softmax over one score is exactly 1: the output is the value row
                parts.append(v_of[group[0]])
                continue
            k, v = ((paddle.concat([d[s] for s in group], axis=1) if len(group) > 1 else d[group[0]]) for d in (k_of, v_of))
            q, k = to_heads(q), to_heads(k)
            weights = paddle.matmul(q * scale, k, transpose_y=True)
            if bias is not None:
                weights = weights + bias(b, k0, k1)
            if kind in ("causal", "prefix"):
                weights = weights + block_mask(q0 - k0, q1 - q0)
            out = paddle.matmul(F.softmax(weights, axis=-1), to_heads(v))
            parts.append(to_heads(out))
        rows.append(paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0])
    if seq_first:
        rows = [r.reshape([q_len, 1, heads * head_dim]) for r in rows]
        out = paddle.concat(rows, axis=1) if len(rows) > 1 else rows[0]
        return out.reshape([q_len, bsz, heads * head_dim])
    out = paddle.concat(rows, axis=0) if len(rows) > 1 else rows[0]
    return out.reshape([bsz, q_len, heads * head_dim])


def _plain_inputs(query_states, key_states, attention_mask) -> bool:
    """q/k/v and mask of the shape the per-block path takes: float32, self-attention over the whole row (no cache),
    a 4-D additive mask."""
    import paddle

    return (attention_mask is not None and query_states.dtype == paddle.float32
            and key_states.shape[1] == query_states.shape[1] and len(attention_mask.shape) == 4)


def _llama_segment_attention(query_states, config, key_states, value_states, attention_mask, output_attentions,
                             alibi=None, attn_mask_startend_row_indices=None, sequence_parallel=False,
                             reshard_layer=None, npu_is_casual=False, skip_recompute=False):
    """paddlenlp's LLaMA scaled_dot_product_attention (same signature), computed per query group of the mask."""
    out = None
    if (not (output_attentions or alibi is not None or attn_mask_startend_row_indices is not None or sequence_parallel
             or reshard_layer is not None or getattr(config, "use_flash_attention", False))
            and _plain_inputs(query_states, key_states, attention_mask)):
        out = _per_block_attention(query_states, key_states, value_states, attention_mask)
    if out is None:
        out = _original_attention["llama"](query_states, config, key_states, value_states, attention_mask, output_attentions,
                                           alibi=alibi, attn_mask_startend_row_indices=attn_mask_startend_row_indices,
                                           sequence_parallel=sequence_parallel, reshard_layer=reshard_layer,
                                           npu_is_casual=npu_is_casual, skip_recompute=skip_recompute)
    return out


def _qwen2_segment_attention(query_states, config, key_states, value_states, attention_mask, output_attentions,
                             attn_mask_startend_row_indices=None, training=True, sequence_parallel=False,
                             skip_recompute=False):
    """paddlenlp's Qwen2 scaled_dot_product_attention (same signature; its key/value heads are already repeated to
    the query heads), computed per query group of the mask; attention dropout in training takes paddlenlp's path."""
    out = None
    if (not (output_attentions or attn_mask_startend_row_indices is not None or sequence_parallel
             or getattr(config, "use_flash_attention", False) or (training and getattr(config, "attention_dropout", 0) > 0))
            and _plain_inputs(query_states, key_states, attention_mask)):
        out = _per_block_attention(query_states, key_states, value_states, attention_mask)
    if out is None:
        out = _original_attention["qwen2"](query_states, config, key_states, value_states, attention_mask, output_attentions,
                                           attn_mask_startend_row_indices=attn_mask_startend_row_indices, training=training,
                                           sequence_parallel=sequence_parallel, skip_recompute=skip_recompute)
    return out


def _split_seq(t, spans, length):
    """The [1, span, ...] pieces of t [1, length, ...] for each (start, end) in spans: one split over the
    sequence when the spans tile it in order (query groups always do), else a slice per span."""
    import paddle

    if spans[0][0] == 0 and spans[-1][1] == length and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return paddle.split(t, [e - s for s, e in spans], axis=1) if len(spans) > 1 else [t]
    return [t[:, s:e] for s, e in spans]


def _patch_segment_attention(model, module: str, attention_class: str, inner_name: str, patched: Callable) -> int:
    import importlib

    modeling = importlib.import_module(f"paddlenlp.transformers.{module}.modeling")
    if module not in _original_attention:
        _original_attention[module] = modeling.scaled_dot_product_attention
    n = 0
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, getattr(modeling, attention_class)) and getattr(layer, "attn_func", None) is _original_attention[module]:
            layer.attn_func = patched
            n += 1
    if n and getattr(model, inner_name, None) is not None:
        _mark_active(getattr(model, inner_name))  # the mask's groups are dropped when the forward ends
    return 1 if n else 0


def _patch_llama_segment_attention(model) -> int:
    return _patch_segment_attention(model, "llama", "LlamaAttention", "llama", _llama_segment_attention)


def _patch_qwen2_segment_attention(model) -> int:
    return _patch_segment_attention(model, "qwen2", "Qwen2Attention", "qwen2", _qwen2_segment_attention)


def _gpt_core_attention(self, q, k, v, attention_mask=None, output_attentions=False):
    """GPT's MultiHeadAttention._core_attention (q/k/v [batch, seq, heads, head_dim], mask additive with -1e4),
    computed per query group of the mask; attention dropout in training, scale_qk_coeff and attention weights take
    paddlenlp's path."""
    cfg = self.config
    if (not (output_attentions or cfg.scale_qk_coeff != 1.0 or (cfg.attention_probs_dropout_prob and self.training))
            and _plain_inputs(q, k, attention_mask)):
        out = _per_block_attention(q, k, v, attention_mask, scale=self.head_dim ** -0.5)  # as paddlenlp scales q
        if out is not None:
            return out
    return type(self)._core_attention(self, q, k, v, attention_mask=attention_mask, output_attentions=output_attentions)


def _patch_gpt_segment_attention(model) -> int:
    from paddlenlp.transformers.gpt import modeling

    if model.config.tensor_parallel_degree > 1 or getattr(model.config, "sequence_parallel", False):
        return 0
    return _patch_core_attention(model, modeling.MultiHeadAttention, _gpt_core_attention, model.gpt)


def _patch_core_attention(model, attention_class, core_attention: Callable, inner) -> int:
    """Bind core_attention as the `_core_attention` of every attention_class layer of the model (GPT's and
    ChatGLM2's attention look that method up per call), and mark `inner` (the decoder) active so that the mask's
    groups are dropped when its forward ends."""
    n = 0
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, attention_class) and "_core_attention" not in vars(layer):
            layer._core_attention = types.MethodType(core_attention, layer)
            n += 1
    if n:
        _mark_active(inner)
    return 1 if n else 0


def _chatglm_v2_core_attention(self, q, k, v, attention_mask=None, output_attentions=False):
    """ChatGLM2's SelfAttention._core_attention (q/k/v [seq, batch, heads, head_dim], the multi-query key/value groups
    already repeated to the query heads; additive mask of 0 / finfo.min), computed per query group of the mask. Its
    CoreAttention scales the scores by 1 / (sqrt(head_dim) * layer number) and back by the layer number
    (apply_query_key_layer_scaling): 1 / sqrt(head_dim) up to float rounding, the scale used here. A cache (more keys
    than queries), attention dropout in training, sequence or tensor parallel, attention weights asked for and
    non-float32 take paddlenlp's path."""
    import paddle

    core, cfg = self.core_attention, self.config
    if (not (output_attentions or cfg.sequence_parallel or cfg.tensor_parallel_degree > 1
             or (self.training and core.attention_dropout.p > 0))
            and attention_mask is not None and len(attention_mask.shape) == 4 and q.dtype == paddle.float32
            and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2]):
        out = _per_block_attention(q, k, v, attention_mask, scale=core.hidden_size_per_attention_head ** -0.5, seq_first=True)
        if out is not None:
            return out
    return type(self)._core_attention(self, q, k, v, attention_mask=attention_mask, output_attentions=output_attentions)


def _patch_chatglm_v2_segment_attention(model) -> int:
    from paddlenlp.transformers.chatglm_v2 import modeling

    return _patch_core_attention(model, modeling.SelfAttention, _chatglm_v2_core_attention, model.chatglm_v2)


def _opt_attention_forward(self, query, key, value, attn_mask=None, use_cache=False, cache=None):
    """OPT's MultiHeadAttention.forward with the product computed per query group of the mask. Its attention weights
    are returned only for output_attentions (OPT's decoder layer drops them otherwise): when a patched OPTModel's
    forward asks for them, or with attention dropout in training, a cache, or fused q/k/v, paddlenlp's forward runs."""
    own = type(self).forward
    if (getattr(_state, "opt_attentions", True) or (self.dropout and self.training) or use_cache or cache is not None
            or self.fuse_attention_qkv or key is not query or value is not query):
        return own(self, query, key, value, attn_mask, use_cache, cache)
    import paddle

    if (attn_mask is None or len(attn_mask.shape) != 4 or query.dtype != paddle.float32
            or _mask_groups(attn_mask, query.shape[0]) is None):
        return own(self, query, key, value, attn_mask, use_cache, cache)
    # the projections of _prepare_qkv/compute_kv, left [batch, seq, heads, head_dim]: the per-block code splits the
    # sequence axis, whose pieces are contiguous there (after paddlenlp's transpose to heads-first they are not)
    q, k, v = (proj(query).reshape([0, 0, self.num_heads, self.head_dim]) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = _per_block_attention(q, k, v, attn_mask, scale=self.head_dim ** -0.5)
    if out is None:
        return own(self, query, key, value, attn_mask, use_cache, cache)
    out = self.out_proj(out)
    return (out, None) if self.need_weights else out


def _replace_attention_forwards(model, attention_class, forward) -> int:
    """Give every attention_class layer of model (not already patched) the per-block forward; how many."""
    n = 0
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, attention_class) and "forward" not in vars(layer):
            _replace_forward(layer, lambda previous: forward)
            n += 1
    return n


def _patch_opt_segment_attention(model) -> int:
    from paddlenlp.transformers.opt import modeling

    cfg = model.config
    if cfg.tensor_parallel_degree > 1:
        return 0
    n = _replace_attention_forwards(model, modeling.MultiHeadAttention, _opt_attention_forward)
    if not n:
        return 0
    inner = model.opt
    sig = inspect.signature(type(inner).forward)

    def make(previous):
        def forward(self, *args, **kwargs):
            a = sig.bind(self, *args, **kwargs).arguments
            wanted = a.get("output_attentions")
            before = getattr(_state, "opt_attentions", True)
            _state.opt_attentions = bool(wanted if wanted is not None else self.config.output_attentions)
            try:
                return previous(self, *args, **kwargs)
            finally:
                _state.opt_attentions = before
        return forward

    _replace_forward(inner, make)
    _mark_active(inner)  # the mask's groups are dropped when the forward ends
    return 1


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, head_mask=None,
                             use_cache=False, output_attentions=False):
    """Bloom's attention forward with the product computed per query group of the mask, ALiBi added per block
    (the bias of the block's keys: the same values the full product adds). A cache, head_mask, attention weights,
    attention dropout in training, flash attention, pretraining_tp slices or tensor parallel take paddlenlp's path."""
    import paddle
    from paddlenlp.transformers.bloom.modeling import dropout_add

    def own():
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  head_mask=head_mask, use_cache=use_cache, output_attentions=output_attentions)

    cfg = self.config
    if (layer_past is not None or head_mask is not None or output_attentions or getattr(cfg, "use_flash_attention", False)
            or (self.pretraining_tp > 1 and self.slow_but_exact) or (cfg.attention_dropout and self.training)
            or cfg.tensor_parallel_degree > 1 or hidden_states.dtype != paddle.float32 or attention_mask is None
            or len(attention_mask.shape) != 3):
        return own()
    bsz, length, heads = hidden_states.shape[0], hidden_states.shape[1], self.num_heads
    as_4d = lambda m: m.reshape([bsz, heads, length, length])[:, :1]  # noqa: E731 (every head's rows are the same)
    if alibi.shape[-1] != length or list(attention_mask.shape) != [bsz * heads, length, length]:
        return own()
    groups = _mask_groups(attention_mask, bsz, as_4d)
    # rows of one example and its padding (unpacked batches): the ALiBi slices per block cost what skipping the
    # padding saves (bench: 0.93-0.97x), so only packed rows take the per-block path
    if groups is None or all(len(row) <= 2 for row in groups):
        return own()
    q, k, v = self._split_heads(self.query_key_value(hidden_states))  # [batch, seq, heads, head_dim] each
    slopes = alibi.reshape([bsz, heads, 1, length]) * self.beta  # as baddbmm scales it
    slope_rows = paddle.split(slopes, bsz, axis=0) if bsz > 1 else [slopes]
    out = _per_block_attention(q, k, v, attention_mask, scale=self.inv_norm_factor,
                               bias=lambda b, k0, k1: paddle.slice(slope_rows[b], [3], [k0], [k1]),
                               as_4d=as_4d)
    if out is None:
        return own()
    out = dropout_add(self.dense(out), residual, self.hidden_dropout, self.training)
    return (out, (k, v) if use_cache is True else None)


def _patch_bloom_segment_attention(model) -> int:
    from paddlenlp.transformers.bloom import modeling

    if model.config.tensor_parallel_degree > 1:
        return 0
    n = _replace_attention_forwards(model, modeling.BloomAttention, _bloom_attention_forward)
    if n:
        _mark_active(model.bloom)  # the mask's groups are dropped when the forward ends
    return 1 if n else 0


def _chatglm_attention_forward(self, hidden_states, attention_mask, position_ids, use_cache=False, cache=None,
                               layer_id=0, rotary_embeds=None):
    """ChatGLM v1's attention forward ([seq, batch, hidden] in and out) with the product computed per query group of
    its additive mask (ChatGLMStack turns the bool may-attend mask into 0 / finfo.min once per forward): the prompt of
    a prefix-LM example attends its prompt as a rectangle, its targets the prompt and themselves causally. The same
    q / (sqrt(head_dim) * (layer_id + 1)) and scores times (layer_id + 1) as paddlenlp; a cache (decoding, prefix
    tuning), flash attention, tensor parallel or non-float32 take paddlenlp's path. The attention weights it returns
    are None here (ChatGLMBlock drops them)."""
    import math

    import paddle

    def own():
        return type(self).forward(self, hidden_states, attention_mask, position_ids, use_cache=use_cache, cache=cache,
                                  layer_id=layer_id, rotary_embeds=rotary_embeds)

    cfg = self.config
    length, bsz = hidden_states.shape[:2]
    if (cache is not None or getattr(cfg, "use_flash_attention", False) or cfg.tensor_parallel_degree > 1
            or self.scale_mask_softmax or hidden_states.dtype != paddle.float32 or attention_mask is None
            or list(attention_mask.shape) not in ([bsz, 1, length, length], [1, 1, length, length])
            or _mask_groups(attention_mask, bsz) is None):
        return own()
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    mixed = self.query_key_value(hidden_states).reshape([length, bsz, heads, head_dim * 3])
    q, k, v = paddle.split(mixed, 3, axis=-1)  # [seq, batch, heads, head_dim] each
    q, k = self._core_attention(q, k, position_ids, rotary_embeds)  # the rotary embedding
    coeff = float(layer_id) + 1.0
    if self.attention_scale:
        q = q / (math.sqrt(head_dim) * coeff)
    out = _per_block_attention(q, k, v, attention_mask, scale=coeff, seq_first=True)
    return self.dense(out), ((k, v) if use_cache else None), None


def _patch_prefix_lm_attention(model, attention_class, forward, transformer) -> int:
    """ChatGLM v1's / GLM's attention layers take `forward` (not with tensor parallel); `transformer` is marked active
    so the mask's groups are dropped when its forward ends."""
    if model.config.tensor_parallel_degree > 1:
        return 0
    n = _replace_attention_forwards(model, attention_class, forward)
    if n:
        _mark_active(transformer)
    return 1 if n else 0


def _patch_chatglm_segment_attention(model) -> int:
    from paddlenlp.transformers.chatglm import modeling

    return _patch_prefix_lm_attention(model, modeling.ChatGLMAttention, _chatglm_attention_forward, model.chatglm.transformer)


def _glm_as_4d(mask):
    """GLM's multiplicative 0/1 mask [batch, 1, seq, seq] as an additive one (0 / -65504 as GLMAttention adds); any
    other value (a weight the model would multiply the score by) becomes 0.5, which _query_groups refuses."""
    import paddle

    m = mask.astype("float32")
    return paddle.where(m == 1, paddle.zeros([1]), paddle.where(m == 0, paddle.full([1], -65504.0), paddle.full([1], 0.5)))


def _glm_attention_forward(self, hidden_states, ltor_mask, cache=None):
    """GLMAttention's forward with the product computed per query group of its 0/1 mask (_glm_as_4d): q . k / sqrt(d),
    masked keys at -65504 as paddlenlp (exp() of either is exactly 0). A cache (memories: decoding, prefix tuning),
    attention_scale > 1, attention dropout in training, tensor parallel or non-float32 take paddlenlp's path; the
    output dropout runs as there."""
    import paddle
    from paddlenlp.transformers.glm import modeling

    cfg = self.config
    bsz, length = hidden_states.shape[:2]
    if (cache is not None or cfg.tensor_parallel_degree > 1 or self.attention_scale > 1.0
            or (self.training and self.attention_dropout.p > 0) or hidden_states.dtype != paddle.float32
            or ltor_mask is None or list(ltor_mask.shape) not in ([bsz, 1, length, length], [1, 1, length, length])
            or _mask_groups(ltor_mask, bsz, _glm_as_4d) is None):
        return type(self).forward(self, hidden_states, ltor_mask, cache)
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    q, k, v = (t.reshape([0, 0, heads, head_dim]) for t in paddle.split(self.query_key_value(hidden_states), 3, axis=-1))
    out = self.dense(_per_block_attention(q, k, v, ltor_mask, scale=head_dim ** -0.5, as_4d=_glm_as_4d))
    tracker = modeling.get_rng_state_tracker()
    if "global_seed" in tracker.states_:
        with tracker.rng_state("global_seed"):
            return self.output_dropout(out)
    return self.output_dropout(out)


def _patch_glm_segment_attention(model) -> int:
    from paddlenlp.transformers.glm import modeling

    return _patch_prefix_lm_attention(model, modeling.GLMAttention, _glm_attention_forward, model.glm.transformer)


def _patch_last_logits(model, backbone: Callable, head: Callable, output_class: str, seq_first: bool = False,
                       rest: Callable = _rest_of, none_means_tuple: bool = False, after_head: Callable = None) -> int:
    """Inside `generating()`, in eval mode without labels: the head on the last position only ([batch, 1, vocab]
    logits). backbone/head/seq_first/rest as in _patch_supervised_loss; after_head(logits) finishes the logits as the
    model's forward does (ChatGLM v1: [1, batch, vocab] -> [batch, 1, vocab] float32). Anything else runs the
    model's own forward."""
    from paddlenlp.transformers import model_outputs

    cfg = model.config
    sig = inspect.signature(type(model).forward)
    output_cls = getattr(model_outputs, output_class)

    def make(previous):
        def forward(self, *args, **kwargs):
            if (not getattr(_state, "last_only", False) or self.training or cfg.tensor_parallel_degree > 1
                    or getattr(cfg, "sequence_parallel", False)):
                return previous(self, *args, **kwargs)
            a = sig.bind(self, *args, **kwargs).arguments
            if a.get("labels") is not None or a.get("attn_mask_startend_row_indices") is not None:
                return previous(self, *args, **kwargs)
            return_dict = _return_dict(self, sig, a, none_means_tuple)
            outputs = backbone(self, a, return_dict)
            hidden = _hidden_of(outputs)
            logits = head(self)(hidden[-1:] if seq_first else hidden[:, -1:])
            if after_head is not None:
                logits = after_head(logits)
            return _lm_output(output_cls, return_dict, outputs, None, logits, rest)
        return forward

    _replace_forward(model, make)
    return 1


def _llama_backbone(self, a, return_dict):
    return self.llama(
        a.get("input_ids"), position_ids=a.get("position_ids"), attention_mask=a.get("attention_mask"),
        inputs_embeds=a.get("inputs_embeds"), use_cache=a.get("use_cache", False),
        past_key_values=a.get("past_key_values"), output_attentions=a.get("output_attentions"),
        output_hidden_states=a.get("output_hidden_states"), return_dict=return_dict)


def _patch_llama_last_logits(model) -> int:
    return _patch_last_logits(model, _llama_backbone, lambda self: self.lm_head, "CausalLMOutputWithCrossAttentions")


def _patch_chatglm_generation_inputs(model) -> int:
    """ChatGLM v1: prepare_inputs_for_generation without the per-row mask-token scans when position_ids are
    given (the scans' results only build position_ids when none are); anything else runs the original."""
    cls = type(model)
    original = cls.prepare_inputs_for_generation

    def prepare(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        if position_ids is None:
            return original(self, input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            past_key_values=past_key_values, cache=cache, **kwargs)
        if cache is not None or past_key_values is not None:  # a decode step: the last token, position and mask row
            return {"input_ids": input_ids[:, -1].unsqueeze(-1), "cache": (cache if cache is not None else past_key_values)[-1],
                    "position_ids": position_ids[..., -1:], "use_cache": True, "attention_mask": attention_mask[:, :, -1:]}
        return {"input_ids": input_ids, "cache": cache, "position_ids": position_ids, "use_cache": True,
                "attention_mask": attention_mask}

    model.prepare_inputs_for_generation = types.MethodType(prepare, model)
    return 1


PATCHES: Dict[str, Callable] = {
    "linear_bias_grad": _patch_linear_bias_grad,
    "llama_rms_norm": _patch_llama_rms_norm,
    "chatglm_v2_rms_norm": _patch_chatglm_v2_rms_norm,
    "qwen2_rms_norm": _patch_qwen2_rms_norm,
    "qwen2_rotary": _patch_qwen2_rotary,
    "qwen2_segment_attention": _patch_qwen2_segment_attention,
    "chatglm_v2_segment_attention": _patch_chatglm_v2_segment_attention,
    "gpt_segment_attention": _patch_gpt_segment_attention,
    "opt_segment_attention": _patch_opt_segment_attention,
    "bloom_segment_attention": _patch_bloom_segment_attention,
    "chatglm_segment_attention": _patch_chatglm_segment_attention,
    "glm_segment_attention": _patch_glm_segment_attention,
    "llama_rotary": _patch_llama_rotary,
    "llama_supervised_loss": _patch_llama_supervised_loss,
    "llama_last_logits": _patch_llama_last_logits,
    "llama_segment_attention": _patch_llama_segment_attention,
    "chatglm_generation_inputs": _patch_chatglm_generation_inputs,
    "chatglm_v2_supervised_loss": _patch_chatglm_v2_supervised_loss,
    **{f"{f}_supervised_loss": _supervised_loss_patch(f) for f in _HEADS},
    **{f"{f}_last_logits": _last_logits_patch(f) for f in _HEADS},
}


def names() -> List[str]:
    return list(PATCHES)
