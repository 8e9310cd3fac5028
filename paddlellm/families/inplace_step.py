"""The step program of an in-place static export (format 3): RunnerStep runs a family's dynamic decode runner's own
code (its _context, _embed, _layer and _logits: families/*_decode.py) with the KV cache written in place INSIDE the
program, so the exported step computes what the dynamic runner's step computes, op for op.

Format 1 exports the model's own forward, whose KV cache is a [batch, length, heads, head_dim] tensor per layer that
every step grows by concatenation (and transposes before attending): several copies of the whole cache per layer per
step. Format 2 (before this) attended over the cache and the new keys as two blocks with a split softmax and returned
the new keys/values for the runner to write: more ops per layer than the dynamic runner, and 8 writes outside the
program. Format 3:

- inputs: input_ids [B, L]; positions [B, L] (int64; absent for families whose step derives them from the mask, OPT
  and Bloom: reads_positions False); mask [B, L, C] additive over the cache's C slots (0 where attended; finfo.min at
  padding, at slots not written yet and at the causal future); slot [1] int64, the cache slot of the first new token;
  then per layer the key and value cache [B, kv_heads, C, head_dim] (the runner's preallocated cache);
- outputs: the last position's logits [B, vocab];
- each layer writes its L new keys/values into slots [slot, slot + L) of the cache tensors it was fed
  (set_value_with_tensor_, in place: paddle.inference runs on the fed tensors' memory, so the runner's cache is
  updated as the dynamic runner's step updates its own) and attends over the whole capacity with one softmax.
- where a layer's q/k/v are three plain linears (GPT, OPT, LLaMA, Qwen2), the program computes them as one product
  over weights joined at export (StepHooks.join_products: two fewer products, and fewer reshapes, per layer than
  the dynamic runner, whose weights stay the model's own).

Every batch/sequence dim is dynamic (a fixed 1 triggers a oneDNN bug; see formats/static.py).
"""
from __future__ import annotations

import inspect
from typing import List

import paddle


class StepHooks:
    """Mixin over a DecodeCore runner class: what RunnerStep asks of the runner besides its layer code."""

    reads_positions = True  # False: the program has no positions input (the step derives what it needs from the mask)
    step_context = False  # True: the step calls the runner's _context(positions, None) for its layers (rotary tables)
    positions_spec = [None, None]  # the positions input's shape ([B, 2, L]: the 2-D positions of ChatGLM v1 and GLM)
    join_qkv = False  # True: fusable() lists each layer's self_attn.q_proj / k_proj / v_proj (GPT unfused, OPT, LLaMA, Qwen2)
    _joined: dict = {}  # join_products: key -> (weight [in, sum(out)], bias or None)

    def fusable(self):
        """[(key, linears)]: groups of projections of one input that the step program computes as one product: with
        join_qkv, each layer's q/k/v under the key the runner's _projections / _head_projections call names
        ("qkv<layer index>")."""
        if not self.join_qkv:
            return []
        return [(f"qkv{i}", (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
                for i, layer in enumerate(self.layers)]

    def join_products(self):
        """Join each fusable group of plain float32 linears (paddle.nn.Linear itself: no LoRA or quantized layer, all
        with or all without a bias) into one [in, sum(out)] weight (and bias), made once at export; returns them by
        buffer name for RunnerStep to register. One product over joined weights gives each output column the same
        dot product as its own linear (up to the GEMM's float rounding) with fewer ops per layer in the program."""
        self._joined = {}
        buffers = {}
        for key, linears in self.fusable():
            plain = all(type(lin) is paddle.nn.Linear and lin.weight.dtype == paddle.float32 for lin in linears)
            biased = {lin.bias is not None for lin in linears}
            if not plain or len(biased) != 1:
                continue
            with paddle.no_grad():
                weight = paddle.concat([lin.weight for lin in linears], axis=1)
                bias = paddle.concat([lin.bias for lin in linears]) if biased == {True} else None
            buffers[f"joined_{key}_weight"] = weight
            if bias is not None:
                buffers[f"joined_{key}_bias"] = bias
            self._joined[key] = (weight, bias)
        return buffers

    def _joined_product(self, key, x, heads):
        """x times the group's joined weight (+ bias) as [B, L, sum(heads), D], or None for a group not joined."""
        joined = self._joined.get(key)
        if joined is None:
            return None
        weight, bias = joined
        out = paddle.matmul(x, weight)
        return (out if bias is None else out + bias).reshape([0, 0, sum(heads), self.head_dim])

    def _projections(self, key, x, linears, heads):
        out = self._joined_product(key, x, heads)
        return super()._projections(key, x, linears, heads) if out is None else paddle.split(out, list(heads), axis=2)

    def _head_projections(self, key, x, linears, heads):
        out = self._joined_product(key, x, heads)  # one transpose for the group, then a split by heads
        if out is None:
            return super()._head_projections(key, x, linears, heads)
        return paddle.split(out.transpose([0, 2, 1, 3]), list(heads), axis=1)

    def _step_inputs(self, positions, mask, slot, end):
        """(positions, bias [B, 1|H, L, C]) from the program's inputs (hook: OPT counts positions from the mask, Bloom
        adds ALiBi)."""
        return positions, mask.unsqueeze(1)


def _write(cache, new, slot, end):
    """cache[:, :, slot:end, :] = new, in place: the output is the fed tensor's own memory (the dynamic runner's
    k_cache[:, :, slot:slot + 1, :] = k; dy2static would turn that assignment into a copy of the whole cache)."""
    return paddle._C_ops.set_value_with_tensor_(cache, new, slot, end, paddle.ones([1], "int64"), [2], [], [])


class _InPlace:
    """The kv callback of a runner layer inside the step program: writes the new k/v into the layer's cache and gives
    the layer the whole cache to attend over (as the dynamic runner's step callback does)."""

    def __init__(self, k_cache, v_cache, slot, end):
        self.k_cache, self.v_cache, self.slot, self.end = k_cache, v_cache, slot, end

    def __call__(self, k, v):
        return _write(self.k_cache, k, self.slot, self.end), _write(self.v_cache, v, self.slot, self.end)


class RunnerStep(paddle.nn.Layer):
    """forward([input_ids, positions?, mask, slot, k/v cache per layer]) -> [logits], computed by `runner` (an instance
    of a StepHooks + DecodeCore runner class)."""

    def __init__(self, runner, buffers=None):
        """buffers: name -> a tensor of the runner's that the program reads (LLaMA's rotary tables, Bloom's ALiBi
        slopes, ChatGLM2's rotary table), registered as buffers of this layer: dy2static can't capture a plain tensor."""
        super().__init__()
        self.model = runner.model  # registered: the program's parameters
        self.runner = runner
        for name, tensor in dict(buffers or {}, **runner.join_products()).items():
            self.register_buffer(name, tensor)
        self.layers = runner.layers
        self.kv_heads, self.head_dim = runner.kv_heads, runner.head_dim
        # the name of the model forward's cache argument, for the generate() host's forward (formats/static.py)
        self.cache_key = "cache" if "cache" in inspect.signature(type(runner.model).forward).parameters else "past_key_values"

    def input_specs(self, dtype: str = "float32") -> List:
        from paddle.static import InputSpec

        specs = [InputSpec([None, None], "int64", "input_ids")]
        if self.runner.reads_positions:  # paddle.jit.save refuses an input no output depends on
            specs.append(InputSpec(list(self.runner.positions_spec), "int64", "positions"))
        specs += [InputSpec([None, None, None], dtype, "mask"), InputSpec([1], "int64", "slot")]
        for i in range(len(self.layers)):
            for kind in ("k", "v"):
                specs.append(InputSpec([None, self.kv_heads, None, self.head_dim], dtype, f"cache_{kind}_{i}"))
        return specs

    def forward(self, feeds):
        runner = self.runner
        input_ids, feeds = feeds[0], feeds[1:]
        positions = None
        if runner.reads_positions:
            positions, feeds = feeds[0], feeds[1:]
        mask, slot, caches = feeds[0], feeds[1], feeds[2:]
        end = slot + paddle.shape(input_ids)[1:2]
        positions, bias = runner._step_inputs(positions, mask, slot, end)
        ctx = runner._context(positions, None) if runner.step_context else None
        hidden = runner._embed(input_ids, positions)
        for i, layer in enumerate(self.layers):
            hidden = runner._layer(i, layer, hidden, ctx, bias, _InPlace(caches[2 * i], caches[2 * i + 1], slot, end))
        return [runner._logits(hidden[:, -1:])]
