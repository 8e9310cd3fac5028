"""GPT's decode runner (GPTFamily.decode_runner): paddlenlp's GPTForCausalLM driven with a KV cache written in place.

A families/decode_core.DecodeCore (cache preallocated and grown by KV_GROW, prompts prefilled in chunks of rows of
similar length, left padding) with GPT's layers, as paddlenlp's GPTModel computes them:

- the model's own sublayers: embeddings (word + learned position embeddings at the given position_ids, which
  generate() extends by +1 per step), norm1/norm2, q/k/v (or fused qkv) and out projections, linear1/linear2 with the
  layer's activation (approximate=True, as paddlenlp calls it), the decoder's final norm, the tied lm_head; so LoRA
  and quantized layers act as in the model;
- pre- or post-LayerNorm as config.normalize_before says;
- scores q * (scale_qk_coeff * head_dim) ** -0.5 against k, times scale_qk_coeff when it is not 1, plus the mask.
  GPTModel's mask is -1e4 at padding and future keys; the runner's finfo.min gives the same softmax (exp of either
  underflows to exactly 0 next to any attended key).

Configurations it does not reproduce get None from for_model (unsupported() says why).
"""
from __future__ import annotations

from typing import Optional

from .decode_core import DecodeCore, common_unsupported, inner


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import GPTForCausalLM
    from paddlenlp.transformers.gpt.modeling import GPTDecoderLayer, MultiHeadAttention

    model = inner(model)
    if not isinstance(model, GPTForCausalLM):
        return f"not a GPTForCausalLM ({type(model).__name__})"
    layers = getattr(model.gpt.decoder, "layers", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    bad = common_unsupported(model, model.gpt.embeddings.word_embeddings.weight.dtype)
    if bad:
        return ", ".join(bad)
    if type(layers[0]) is not GPTDecoderLayer or type(layers[0].self_attn) is not MultiHeadAttention:
        return "a decoder layer of another kind"
    return None


class GPTDecoder(DecodeCore):
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    def __init__(self, model):
        model = inner(model)
        cfg = model.config
        self.model = model
        self.base = model.gpt
        self.layers = list(self.base.decoder.layers)
        self.heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.coeff = cfg.scale_qk_coeff
        self.fused = cfg.fuse_attention_qkv
        self.pre_norm = cfg.normalize_before

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    def _embed(self, ids, positions):
        return self.base.embeddings(input_ids=ids, position_ids=positions)

    def _qkv(self, i, attn, x):
        import paddle

        if self.fused:  # MultiHeadAttention._fuse_prepare_qkv: [B, L, H, 3 * D] split on the last axis
            mix = attn.qkv_proj(x).reshape([0, 0, self.heads, 3 * self.head_dim])
            q, k, v = paddle.split(mix, num_or_sections=3, axis=-1)
        else:
            return self._head_projections(f"qkv{i}", x, (attn.q_proj, attn.k_proj, attn.v_proj), [self.heads] * 3)
        return (t.transpose([0, 2, 1, 3]) for t in (q, k, v))

    def _score(self, q, k):
        import paddle

        product = paddle.matmul(q * ((self.coeff * self.head_dim) ** -0.5), k, transpose_y=True)
        return product.scale(self.coeff) if self.coeff != 1.0 else product

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        attn = layer.self_attn
        q, k, v = self._qkv(i, attn, layer.norm1(hidden) if self.pre_norm else hidden)
        k, v = kv(k, v)
        hidden = hidden + attn.out_proj(self._attend(q, k, v, bias))
        if not self.pre_norm:
            hidden = layer.norm1(hidden)
        x = layer.norm2(hidden) if self.pre_norm else hidden
        hidden = hidden + layer.linear2(layer.activation(layer.linear1(x), approximate=True))
        return hidden if self.pre_norm else layer.norm2(hidden)

    def _logits(self, hidden_last):
        hidden = self.base.decoder.norm(hidden_last)
        from paddlenlp.transformers.gpt.modeling import GPTLMHead

        head = self.model.lm_head
        if type(head) is GPTLMHead and type(head).forward is GPTLMHead.forward and head.transpose_y \
                and not head.config.sequence_parallel and head.weight.dtype == hidden.dtype:
            return self._tied_head(hidden, head.weight)[:, -1, :]  # DecodeCore._tied_head: its batch-1 copy
        return head(hidden)[:, -1, :]


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    from .inplace_step import RunnerStep, StepHooks

    class GPTStep(StepHooks, GPTDecoder):
        @property
        def join_qkv(self):
            return not self.fused  # a fused qkv_proj is one product already

    return RunnerStep(GPTStep(model)) if unsupported(model) is None else None
