"""ChatGLM2's decode runner (ChatGLMv2Family.decode_runner): the model's own layers over a KV cache written in place.

paddlenlp's ChatGLM2 works sequence-first ([length, batch, hidden]) and per step concatenates every layer's
[length, batch, groups, head_dim] key/value cache with the new token, then tiles both over the query heads of
each multi-query group before attending (two copies of the grown cache, two tiled copies, and the transposes of
its bmm layout), plus a rotary table of max_sequence_length rebuilt every forward. The runner (decode_core.DecodeCore)
keeps [batch, groups, capacity, head_dim] key/value buffers, writes each new pair into its slot, and attends
the query heads of a group as one block against the group's keys, batch-first:

- every weight-bearing piece is the model's own sublayer (word embedding, RMSNorm/LayerNorm, query_key_value,
  dense, MLP, final norm, output layer), so LoRA layers, quantized layers and our CPU patches act as in the model;
- the rotary table is the model's RotaryEmbedding output (computed once per runner: it depends on no input),
  gathered by position_ids and applied to the first half of each head exactly as apply_rotary_pos_emb does;
- attention is CoreAttention's formula: q.k^T * (1 / norm_factor), times coeff with
  apply_query_key_layer_scaling, + 0 / finfo.min mask, float32 softmax, times v; the residual follows
  apply_residual_connection_post_layernorm.

Configurations it does not reproduce get a reason from `unsupported` (the decode loop then runs the model's own
forward): tensor / sequence parallel, flash attention, long-sequence strategies, training mode, non-float32
weights, a static-graph shell, a prefix-tuning wrapper (not a ChatGLMv2ForCausalLM).
"""
from __future__ import annotations

from typing import Optional

from .decode_core import DecodeCore, common_unsupported, inner


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import ChatGLMv2ForCausalLM
    from paddlenlp.transformers.chatglm_v2.modeling import GLMBlock, RotaryEmbedding, SelfAttention

    lm = inner(model)
    if not isinstance(lm, ChatGLMv2ForCausalLM):
        return f"not a ChatGLMv2ForCausalLM ({type(lm).__name__})"
    base = lm.chatglm_v2
    layers = getattr(getattr(base, "encoder", None), "layers", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    bad = common_unsupported(lm, base.embedding.word_embeddings.weight.dtype)
    if getattr(lm.config, "use_long_sequence_strategies", False):
        bad.append("use_long_sequence_strategies")
    if bad:
        return ", ".join(bad)
    if not all(type(b) is GLMBlock and type(b.self_attention) is SelfAttention for b in layers):
        return "a decoder layer of another kind"
    if type(base.rotary_pos_emb) is not RotaryEmbedding:
        return f"rotary embedding {type(base.rotary_pos_emb).__name__}"
    return None


class ChatGLMv2Decoder(DecodeCore):
    """ChatGLM2 runner: multi-query groups as the cache's heads, half-width interleaved rotary."""

    def __init__(self, model):
        import paddle

        lm = inner(model)
        cfg = lm.config
        self.model = lm
        self.base = lm.chatglm_v2
        self.layers = list(self.base.encoder.layers)
        attn = self.layers[0].self_attention
        self.heads = attn.num_attention_heads_per_partition
        self.kv_heads = attn.num_multi_query_groups_per_partition
        self.groups = self.heads // self.kv_heads  # query heads per key/value group (consecutive, as the model tiles them)
        self.head_dim = attn.hidden_size_per_attention_head
        with paddle.no_grad():  # [max_sequence_length, rot / 2, 2] cos/sin pairs, as the model's forward computes them
            self.rope = self.base.rotary_pos_emb(self.base.max_sequence_length)
        self.rot = self.rope.shape[-2] * 2  # leading channels of each head that rotate
        self.residual_post_norm = cfg.apply_residual_connection_post_layernorm

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    # ------------------------------------------------------------------ hooks
    def _context(self, positions, length: int):
        """The rotary pairs at positions [B, L] -> [B, L, 1, rot / 2, 2] (broadcast over heads)."""
        return self.rope[positions].unsqueeze(2)

    def _embed(self, ids, positions):
        hidden = self.base.embedding.word_embeddings(ids)
        return hidden.astype("float32") if self.base.embedding.fp32_residual_connection else hidden

    def _rotate(self, x, rope):
        """apply_rotary_pos_emb on batch-first x [B, L, heads, D]: the same products, in the same order."""
        import paddle

        x, x_pass = x[..., : self.rot], x[..., self.rot:]
        pairs = x.reshape([0, 0, 0, self.rot // 2, 2])  # 0: the dim kept (dynamic in the static step program)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = rope[..., 0], rope[..., 1]
        out = paddle.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(3)
        return paddle.concat([out, x_pass], axis=-1)

    def _layer(self, i, layer, hidden, rope, bias, kv):
        attn = layer.self_attention
        normed = layer.input_layernorm(hidden)
        q, k, v = attn.query_key_value(normed).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], axis=-1)
        q = self._rotate(q.reshape([0, 0, self.heads, self.head_dim]), rope)
        k = self._rotate(k.reshape([0, 0, self.kv_heads, self.head_dim]), rope)
        v = v.reshape([0, 0, self.kv_heads, self.head_dim])
        k, v = kv(k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3]))  # [B, groups, K, D]
        # the group's query heads as one [groups * L] block: [B, KV, G * L, D]
        q = q.transpose([0, 2, 1, 3]).reshape([0, self.kv_heads, -1, self.head_dim])
        self._core = attn.core_attention  # _score's: this layer's norm_factor and coeff (layer-number scaling)
        out = attn.dense(self._attend(q, k, v, self._group_bias(bias)))
        hidden = (normed if self.residual_post_norm else hidden) + out
        normed = layer.post_attention_layernorm(hidden)
        return (normed if self.residual_post_norm else hidden) + layer.mlp(normed)

    def _group_bias(self, bias):
        """The [B, 1, L, K] bias repeated for the G query heads of a group's [G * L] rows."""
        return bias.tile([1, 1, self.groups, 1]) if self.groups > 1 else bias

    def _score(self, q, k):
        """The current layer's CoreAttention scores (set by _layer): q.k^T * (1 / norm_factor), times coeff with
        apply_query_key_layer_scaling (coeff = the layer number, so each layer rounds as its own module does)."""
        import paddle

        core = self._core
        scores = paddle.matmul(q, k, transpose_y=True) * (1.0 / core.norm_factor)
        return scores * core.coeff if core.coeff is not None else scores

    def _merge_heads(self, out):
        """[B, KV, G * L, D] -> [B, L, H * D]."""
        out = out.reshape([0, self.heads, -1, self.head_dim]).transpose([0, 2, 1, 3])
        return out.reshape([0, 0, self.heads * self.head_dim])

    def _logits(self, hidden_last):
        encoder = self.base.encoder
        if encoder.post_layer_norm:
            hidden_last = encoder.final_layernorm(hidden_last)
        # the output layer takes sequence-first [1, B, h] and returns batch-first [B, 1, vocab]
        return self.base.output_layer(hidden_last.transpose([1, 0, 2]))[:, -1, :]


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    from .inplace_step import RunnerStep, StepHooks

    class ChatGLMv2Step(StepHooks, ChatGLMv2Decoder):
        step_context = True  # the rotary pairs at the positions

    if unsupported(model) is not None:
        return None
    runner = ChatGLMv2Step(model)
    return RunnerStep(runner, buffers={"rope_table": runner.rope})
