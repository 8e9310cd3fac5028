"""The step program of an in-place static export (format 2): InPlaceStep for LLaMA-design decoders (LLaMA, Qwen2);
RunnerStep (below) for GPT, OPT, Bloom and ChatGLM2, running their dynamic decode runner's own layer code.

Format 1 exports the model's own forward, whose KV cache is a [batch, length, heads, head_dim] tensor per layer
that every step grows by concatenation (and transposes before attending): several copies of the whole cache
per layer per step. Like the dynamic decode runner (families/llama_decode.py), this program is built from the
model's own sublayers (embedding, RMSNorms, q/k/v/o projections, MLP, final norm, lm_head) and never copies the
cache:

- inputs: input_ids [B, L] and positions [B, L] (int64); past_mask [B, C] additive (0 where attended, finfo.min
  at padding and at slots not written yet); new_mask [B, L, L] additive over the L new tokens (causal and
  padding); then per layer the past key and value [B, kv_heads, C, head_dim] (the runner's preallocated cache,
  C = its capacity);
- outputs: the last position's logits [B, vocab], then per layer the new key and value [B, kv_heads, L,
  head_dim]; the runner (formats/static.py InPlaceRunner) writes them into its cache slots in place;
- attention is a split softmax over the past capacity and the new block (one shared maximum and sum), so the
  new keys are never concatenated onto the cache; masked slots get weight exactly 0;
- rotary tables are the model's rotary module's own (so linear / llama3 scaling are kept), gathered at the
  positions inside the program; rotate and the sign-folded sin are cpu_kernels' (the dynamic runner's).

Every batch/sequence dim is dynamic (a fixed 1 triggers a oneDNN bug; see formats/static.py).
"""
from __future__ import annotations

import inspect
import math
from typing import List

import paddle
import paddle.nn.functional as F

from ..cpu_kernels import rotate  # imported here: dy2static's transformed forward can't resolve relative imports


class InPlaceStep(paddle.nn.Layer):
    """forward([input_ids, positions, past_mask, new_mask, past k/v per layer]) -> [logits, new k/v per layer]."""

    def __init__(self, model, base_attr: str):
        super().__init__()
        from paddlenlp.peft import LoRAModel

        inner = model.model if isinstance(model, LoRAModel) else model
        cfg = inner.config
        base = getattr(inner, base_attr)
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.lm_head = inner.lm_head
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        rotary = self.layers[0].self_attn.rotary_emb
        with paddle.no_grad():
            # the module's own [1, length, 1, D] tables, as the dynamic runner reads them (x is read for its dtype)
            cos, sin = rotary(self.embed_tokens.weight, seq_len=rotary.cos_cached.shape[1])
            d = sin.shape[-1]
            sign = paddle.concat([paddle.full([d // 2], -1.0, sin.dtype), paddle.full([d - d // 2], 1.0, sin.dtype)])
            self.register_buffer("cos_table", cos[0, :, 0, :].clone())
            self.register_buffer("sin_table", (sin[0, :, 0, :] * sign).clone())  # sign of rotate_half folded in

    def input_specs(self, dtype: str = "float32") -> List:
        from paddle.static import InputSpec

        specs = [InputSpec([None, None], "int64", "input_ids"), InputSpec([None, None], "int64", "positions"),
                 InputSpec([None, None], dtype, "past_mask"), InputSpec([None, None, None], dtype, "new_mask")]
        for i in range(len(self.layers)):
            for kind in ("k", "v"):
                specs.append(InputSpec([None, self.kv_heads, None, self.head_dim], dtype, f"past_{kind}_{i}"))
        return specs

    def forward(self, feeds):
        """feeds: [input_ids, positions, past_mask, new_mask, past k/v per layer] (one list: what input_specs names)."""
        input_ids, positions, past_mask, new_mask = feeds[:4]
        caches = feeds[4:]
        cos = F.embedding(positions, self.cos_table).unsqueeze(2)  # [B, L, 1, D]
        sin = F.embedding(positions, self.sin_table).unsqueeze(2)
        past_mask = past_mask.unsqueeze([1, 2])  # [B, 1, 1, C]
        new_mask = new_mask.unsqueeze(1)  # [B, 1, L, L]
        if self.groups > 1:  # the G query heads of a key/value head attend as one [G * L] block
            new_mask = paddle.tile(new_mask, [1, 1, self.groups, 1])
        hidden = self.embed_tokens(input_ids)
        out = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = rotate(attn.q_proj(x).reshape([0, 0, self.heads, self.head_dim]), cos, sin).transpose([0, 2, 1, 3])
            k = rotate(attn.k_proj(x).reshape([0, 0, self.kv_heads, self.head_dim]), cos, sin).transpose([0, 2, 1, 3])
            v = attn.v_proj(x).reshape([0, 0, self.kv_heads, self.head_dim]).transpose([0, 2, 1, 3])
            out += [k, v]
            q = (q * self.scale).reshape([0, self.kv_heads, -1, self.head_dim])  # [B, KV, G * L, D]
            past = paddle.matmul(q, caches[2 * i], transpose_y=True) + past_mask  # [B, KV, G * L, C]
            new = paddle.matmul(q, k, transpose_y=True) + new_mask  # [B, KV, G * L, L]
            top = paddle.maximum(past.max(axis=-1, keepdim=True), new.max(axis=-1, keepdim=True))
            past, new = paddle.exp(past - top), paddle.exp(new - top)
            total = past.sum(axis=-1, keepdim=True) + new.sum(axis=-1, keepdim=True)
            o = (paddle.matmul(past, caches[2 * i + 1]) + paddle.matmul(new, v)) / total  # [B, KV, G * L, D]
            o = o.reshape([0, self.heads, -1, self.head_dim]).transpose([0, 2, 1, 3]).reshape([0, 0, self.heads * self.head_dim])
            hidden = hidden + attn.o_proj(o)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.lm_head(self.norm(hidden[:, -1:]))[:, -1, :]
        return [logits] + out


# ---------------------------------------------------------------------------------------------------------------
# GPT, OPT, Bloom, ChatGLM2: the step program runs the family's dynamic decode runner's own layer code (its _embed, _layer,
# _logits), so the program and the runner compute the same thing; only the attention is split (SplitAttention).
class SplitAttention:
    """Mixin over a DecodeCore runner class: _attend over the cache and the new block, k/v/bias given as (past,
    new) pairs, one shared softmax maximum and sum (so the new keys are never concatenated onto the cache)."""

    def _attend(self, q, k, v, bias):
        (k_past, k_new), (v_past, v_new), (b_past, b_new) = k, v, bias
        past = self._score(q, k_past) + b_past  # [B, H, Lq, C]
        new = self._score(q, k_new) + b_new  # [B, H, Lq, L]
        top = paddle.maximum(past.max(axis=-1, keepdim=True), new.max(axis=-1, keepdim=True))
        past, new = paddle.exp(past - top), paddle.exp(new - top)
        total = past.sum(axis=-1, keepdim=True) + new.sum(axis=-1, keepdim=True)
        out = (paddle.matmul(past, v_past) + paddle.matmul(new, v_new)) / total
        return self._merge_heads(out)

    reads_positions = True  # False: the program has no positions input (the step derives what it needs from the masks)
    step_context = False  # True: the step calls the runner's _context(positions, None) for its layers (ChatGLM2's rotary pairs)

    def _step_inputs(self, positions, past_mask, new_mask):
        """(positions, (past bias [B, 1|H, 1, C], new bias [B, 1|H, L, L])) from the program's inputs (hook: OPT counts
        positions from the masks, Bloom adds ALiBi)."""
        return positions, (past_mask.unsqueeze([1, 2]), new_mask.unsqueeze(1))


class _Collect:
    """The kv callback of a runner layer inside the step program: keeps the new k/v for the outputs and gives the
    layer (cache, new) pairs to attend over."""

    def __init__(self, k_past, v_past, out: list):
        self.k_past, self.v_past, self.out = k_past, v_past, out

    def __call__(self, k, v):
        self.out.extend([k, v])
        return (self.k_past, k), (self.v_past, v)


class RunnerStep(paddle.nn.Layer):
    """forward([input_ids, positions, past_mask, new_mask, past k/v per layer]) -> [logits, new k/v per layer], computed
    by `runner` (an instance of a SplitAttention + DecodeCore runner class); the same inputs/outputs as InPlaceStep,
    without positions when the runner does not read them (reads_positions False: OPT, Bloom)."""

    def __init__(self, runner, buffers=None):
        """buffers: name -> a tensor of the runner's that the program reads (Bloom's ALiBi slopes, ChatGLM2's rotary
        table), registered as buffers of this layer: dy2static can't capture a plain tensor."""
        super().__init__()
        self.model = runner.model  # registered: the program's parameters
        self.runner = runner
        for name, tensor in (buffers or {}).items():
            self.register_buffer(name, tensor)
        self.layers = runner.layers
        self.kv_heads, self.head_dim = runner.kv_heads, runner.head_dim
        # the name of the model forward's cache argument, for the generate() host's forward (formats/static.py)
        self.cache_key = "cache" if "cache" in inspect.signature(type(runner.model).forward).parameters else "past_key_values"

    def input_specs(self, dtype: str = "float32") -> List:
        specs = InPlaceStep.input_specs(self, dtype)
        # paddle.jit.save refuses an input no output depends on; InPlaceProgram feeds only the names saved
        return specs if self.runner.reads_positions else [s for s in specs if s.name != "positions"]

    def forward(self, feeds):
        runner = self.runner
        if runner.reads_positions:
            input_ids, positions, past_mask, new_mask = feeds[:4]
            caches = feeds[4:]
        else:
            input_ids, past_mask, new_mask = feeds[:3]
            positions, caches = None, feeds[3:]
        positions, bias = runner._step_inputs(positions, past_mask, new_mask)
        ctx = runner._context(positions, None) if runner.step_context else None
        hidden = runner._embed(input_ids, positions)
        out: list = []
        for i, layer in enumerate(self.layers):
            hidden = runner._layer(i, layer, hidden, ctx, bias, _Collect(caches[2 * i], caches[2 * i + 1], out))
        return [runner._logits(hidden[:, -1:])] + out
