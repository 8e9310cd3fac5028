"""BLOOM's decode runner (BloomFamily.decode_runner): paddlenlp's BloomForCausalLM driven with a KV cache written in
place.

A families/decode_core.DecodeCore (cache preallocated and grown by KV_GROW, prompts prefilled in chunks of rows of
similar length, left padding) with BLOOM's layers, as paddlenlp's BloomModel computes them:

- no positions: ALiBi adds slope_h * key_position to every score, key_position = (cumsum(mask) - 1) * mask over the
  row's attended keys (build_alibi_tensor's slopes and positions, so a padding hole does not advance them); a cached
  key keeps its bias, so the runner builds the bias over the cache's slots from the same mask every step;
- scores as BloomAttention's baddbmm: beta * alibi + inv_norm_factor * (q @ k^T), plus 0 / finfo.min for the mask;
- the model's own sublayers: word embeddings and their layer norm, input/post-attention layer norms (with
  apply_residual_connection_post_layernorm the residuals are the normed states), the fused query_key_value projection
  split as [heads, 3, head_dim], dense, the MLP (its own gelu and residual add), ln_f and the tied lm_head; so LoRA
  and quantized layers act as in the model.

Configurations it does not reproduce get None from for_model (unsupported() says why).
"""
from __future__ import annotations

from typing import Optional

from .decode_core import DecodeCore, common_unsupported, inner


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import BloomForCausalLM
    from paddlenlp.transformers.bloom.modeling import BloomAttention, BloomBlock

    model = inner(model)
    if not isinstance(model, BloomForCausalLM):
        return f"not a BloomForCausalLM ({type(model).__name__})"
    layers = getattr(model.bloom, "h", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    cfg = model.config
    bad = common_unsupported(model, model.bloom.word_embeddings.weight.dtype)
    checks = {
        "use_long_sequence_strategies": getattr(cfg, "use_long_sequence_strategies", False),
        "slow_but_exact with pretraining_tp > 1": getattr(cfg, "slow_but_exact", False) and getattr(cfg, "pretraining_tp", 1) > 1,
    }
    bad += [name for name, hit in checks.items() if hit]
    if bad:
        return ", ".join(bad)
    if type(layers[0]) is not BloomBlock or type(layers[0].self_attention) is not BloomAttention:
        return "a decoder layer of another kind"
    return None


def alibi_slopes(heads: int):
    """[heads] ALiBi slopes, as paddlenlp's build_alibi_tensor computes them."""
    import math

    import paddle

    closest = 2 ** math.floor(math.log2(heads))
    base = paddle.full([], 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=paddle.float32)
    slopes = paddle.pow(base, paddle.arange(1, 1 + closest, dtype=paddle.float32))
    if closest != heads:
        extra_base = paddle.to_tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=paddle.float32)
        remaining = min(closest, heads - closest)
        slopes = paddle.concat([slopes, paddle.pow(extra_base, paddle.arange(1, 1 + 2 * remaining, 2, dtype=paddle.float32))])
    return slopes


class BloomDecoder(DecodeCore):
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    def __init__(self, model):
        model = inner(model)
        cfg = model.config
        self.model = model
        self.base = model.bloom
        self.layers = list(self.base.h)
        self.heads = self.kv_heads = cfg.n_head
        self.head_dim = cfg.hidden_size // cfg.n_head
        self.slopes = alibi_slopes(self.heads)[None, :, None, None]  # [1, H, 1, 1]
        self.post_residual = cfg.apply_residual_connection_post_layernorm

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    def _bias(self, allowed, keep):
        """0 / finfo.min for the mask plus ALiBi: slope_h * (cumsum(keep) - 1) * keep over the keys, [B, H, Lq, K]."""
        keep = keep.astype("float32")
        key_positions = ((keep.cumsum(axis=-1) - 1) * keep)[:, None, None, :]
        return super()._bias(allowed, keep) + self._alibi(key_positions)

    def _alibi(self, key_positions):
        """beta * slope_h * key position: [B, 1, 1, K] positions -> [B, H, 1, K]."""
        return self.layers[0].self_attention.beta * (self.slopes * key_positions)

    def _embed(self, ids, positions):
        return self.base.word_embeddings_layernorm(self.base.word_embeddings(ids))

    def _score(self, q, k):
        import paddle

        return paddle.matmul(q, k, transpose_y=True) * self.layers[0].self_attention.inv_norm_factor

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        attn = layer.self_attention
        normed = layer.input_layernorm(hidden)
        residual = normed if self.post_residual else hidden
        fused = attn.query_key_value(normed).reshape([0, 0, self.heads, 3, self.head_dim])
        q, k, v = (fused[:, :, :, j, :].transpose([0, 2, 1, 3]) for j in range(3))
        k, v = kv(k, v)
        attended = residual + attn.dense(self._attend(q, k, v, bias))
        normed = layer.post_attention_layernorm(attended)
        return layer.mlp(normed, normed if self.post_residual else attended)

    def _logits(self, hidden_last):
        hidden = self.base.ln_f(hidden_last)
        from paddlenlp.transformers.bloom.modeling import BloomLMHead

        head = self.model.lm_head
        if type(head) is BloomLMHead and type(head).forward is BloomLMHead.forward and head.decoder_weight.dtype == hidden.dtype:
            return self._tied_head(hidden, head.decoder_weight)[:, -1, :]  # DecodeCore._tied_head: its batch-1 copy
        return head(hidden, self.model.config.tensor_parallel_output)[:, -1, :]


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    from .inplace_step import RunnerStep, StepHooks

    class BloomStep(StepHooks, BloomDecoder):
        reads_positions = False

        def _step_inputs(self, positions, mask, slot, end):
            # ALiBi's key positions from the mask, as _bias counts them over the cache's slots: (cumsum(keep) - 1) *
            # keep, keep = what the last query attends (every kept slot; a padding hole does not advance them)
            keep = (mask[:, -1, :] == 0).astype("float32")  # [B, C]
            key_positions = (keep.cumsum(axis=-1) - 1) * keep
            return None, mask.unsqueeze(1) + self._alibi(key_positions[:, None, None, :])

    if unsupported(model) is not None:
        return None
    runner = BloomStep(model)
    return RunnerStep(runner, buffers={"alibi_slopes": runner.slopes})
