"""OPT's decode runner (OPTFamily.decode_runner): paddlenlp's OPTForCausalLM driven with a KV cache written in place.

A families/decode_core.DecodeCore (cache preallocated and grown by KV_GROW, prompts prefilled in chunks of rows of
similar length, left padding) with OPT's layers, as paddlenlp's OPTModel computes them:

- positions come from the attention mask, as OPTLearnedPositionEmbedding derives them: cumsum(mask) - 1 (a padding
  hole does not advance them), looked up at position + offset (2) in the model's own position embedding; each step
  the next one (+1);
- the model's own sublayers: word embeddings, project_in/project_out (word_embed_proj_dim != hidden_size, e.g.
  OPT-350m), norm1/norm2, q/k/v and out projections, linear1/linear2 with the layer's activation, the final layer
  norm (only with normalize_before, as TransformerDecoder builds it), the lm_head; so LoRA and quantized layers act as
  in the model;
- pre- or post-LayerNorm as the layers' normalize_before says; scores q * head_dim ** -0.5 against k plus the mask
  (OPTModel adds finfo.min for padding and again for future keys; the runner adds it once: the same softmax on every
  query row that attends anything).

Configurations it does not reproduce get None from for_model (unsupported() says why).
"""
from __future__ import annotations

from typing import Optional

from .decode_core import DecodeCore, common_unsupported, inner


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import OPTForCausalLM
    from paddlenlp.transformers.opt.modeling import MultiHeadAttention, TransformerDecoderLayer

    model = inner(model)
    if not isinstance(model, OPTForCausalLM):
        return f"not an OPTForCausalLM ({type(model).__name__})"
    layers = getattr(model.opt.decoder, "layers", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    bad = common_unsupported(model, model.opt.embeddings.word_embeddings.weight.dtype)
    if getattr(layers[0].self_attn, "fuse_attention_qkv", False):
        bad.append("fuse_attention_qkv")
    if bad:
        return ", ".join(bad)
    if type(layers[0]) is not TransformerDecoderLayer or type(layers[0].self_attn) is not MultiHeadAttention:
        return "a decoder layer of another kind"
    return None


class OPTDecoder(DecodeCore):
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    def __init__(self, model):
        model = inner(model)
        cfg = model.config
        self.model = model
        self.base = model.opt
        self.layers = list(self.base.decoder.layers)
        self.heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    def _positions(self, inputs, keep):
        import paddle

        return paddle.cumsum(keep.astype("int64"), axis=-1) - 1  # OPTLearnedPositionEmbedding.forward

    def _embed(self, ids, positions):
        import paddle

        emb = self.base.embeddings
        hidden = emb.word_embeddings(ids)
        if emb.project_in is not None:
            hidden = emb.project_in(hidden)
        table = emb.position_embeddings
        return hidden + paddle.nn.Embedding.forward(table, positions + table.offset)

    def _score(self, q, k):
        import paddle

        return paddle.matmul(q * self.head_dim ** -0.5, k, transpose_y=True)

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        attn = layer.self_attn
        pre = layer.normalize_before
        x = layer.norm1(hidden) if pre else hidden
        q, k, v = self._head_projections(f"qkv{i}", x, (attn.q_proj, attn.k_proj, attn.v_proj), [self.heads] * 3)
        k, v = kv(k, v)
        hidden = hidden + attn.out_proj(self._attend(q, k, v, bias))
        if not pre:
            hidden = layer.norm1(hidden)
        x = layer.norm2(hidden) if pre else hidden
        hidden = hidden + layer.linear2(layer.activation(layer.linear1(x)))
        return hidden if pre else layer.norm2(hidden)

    def _logits(self, hidden_last):
        decoder = self.base.decoder
        if decoder.final_layer_norm is not None:
            hidden_last = decoder.final_layer_norm(hidden_last)
        if decoder.project_out is not None:
            hidden_last = decoder.project_out(hidden_last)
        return self._head(hidden_last)[:, -1, :]

    def _head(self, hidden):
        """The lm_head. OPTLMHead.forward casts its [vocab, h] weight to the hidden state's dtype, a copy of the
        whole (tied) embedding every step even when the dtypes already agree: 67 ms against a 10 ms product at
        vocabulary 49152 x 576. The same product without that copy when they agree (the same values: exact);
        the product goes through DecodeCore._tied_head; any other head (LoRA, quantized, a subclass) runs its own
        forward."""
        from paddlenlp.transformers.opt.modeling import OPTLMHead

        head = self.model.lm_head
        if type(head) is OPTLMHead and type(head).forward is OPTLMHead.forward and head.decoder_weight.dtype == hidden.dtype:
            return self._tied_head(hidden, head.decoder_weight)
        return head(hidden)


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    import paddle

    from .inplace_step import RunnerStep, StepHooks

    class OPTStep(StepHooks, OPTDecoder):
        reads_positions = False
        join_qkv = True

        def _step_inputs(self, positions, mask, slot, end):
            # positions counted from the mask, as _positions / _advance do (cumsum(mask) - 1; the program has no
            # positions input): the attended slots up to each new token's own (the last query attends every kept one)
            keep = (mask[:, -1, :] == 0).astype("int64")  # [B, C]
            positions = paddle.slice(paddle.cumsum(keep, axis=-1), [1], slot, end) - 1  # [B, L]
            return super()._step_inputs(positions, mask, slot, end)

    return RunnerStep(OPTStep(model)) if unsupported(model) is None else None
