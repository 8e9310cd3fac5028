"""LLaMA's decode runner: the model's own layers driven with a KV cache written in place (LlamaFamily.decode_runner).

paddlenlp's LLaMA keeps its KV cache as [batch, length, heads, head_dim] tensors that every decode step
grows by concatenation, then transposes (one copy for values, two for keys) before attending: five copies
of every layer's whole cache per step, which at batch 32 x 300 cached tokens was most of the step's time.
This runner (a families/decode_core.DecodeCore: the cache preallocated once per batch as [batch, heads,
capacity, head_dim], each new key/value written into its slot, prompts prefilled in chunks of rows of similar
length, cache growth by KV_GROW) adds LLaMA's layers:

- every weight-bearing piece is the model's own sublayer (embedding, RMSNorms, q/k/v/o projections, MLP,
  final norm, lm_head), so LoRA layers, quantized layers and our CPU patches act as they do in the model; a plain
  tied lm_head's product is computed by DecodeCore._tied_head (at batch 1 on a [h, vocab] copy);
- attention is paddlenlp's formula (q * 1/sqrt(d) against k, + additive mask of 0 / finfo.min, softmax, times
  v) over the whole capacity: slots not written yet are masked like padding, so their weight is exactly 0;
- positions, masks and rotary tables follow paddlenlp's generation rules (left padding, position_ids from
  the inputs then +1 per step, every row's mask extended by one each step, the rotary module's own cos/sin);

The tokens are those of paddlenlp's generate() (tests/test_decode_loop.py: greedy and seeded sampling, every
family); logits agree within float rounding (tests/test_llama_decode.py). Configurations it does not
reproduce (fused qkv, alibi, tensor/sequence/context parallel, flash attention,
fused rope, long-sequence strategies, non-float32 weights, a static-graph shell) get None from for_model,
and the decode loop drives the model through its own forward instead.
"""
from __future__ import annotations

import math
from typing import Optional

from ..cpu_kernels import rotary_tables, rotate  # at the top: dy2static's transformed methods can't resolve relative imports (static_step)
from .decode_core import DecodeCore, common_unsupported, inner

_inner = inner  # qwen2_decode's import name


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import LlamaForCausalLM
    from paddlenlp.transformers.llama.modeling import LlamaAttention, LlamaRotaryEmbedding

    model = inner(model)
    if not isinstance(model, LlamaForCausalLM):
        return f"not a LlamaForCausalLM ({type(model).__name__})"
    return unsupported_layers(model, model.llama, LlamaAttention, LlamaRotaryEmbedding)


def unsupported_layers(model, base, attention_class, rotary_class) -> Optional[str]:
    """Why the runner can't drive causal LM `model` whose decoder is `base` (layers of attention_class with a rotary
    module of rotary_class: LLaMA's, or Qwen2's of the same design), or None when it can."""
    from paddlenlp.transformers.llama.modeling import get_use_casual_mask  # Qwen2's model reads the same switch

    cfg = model.config
    layers = getattr(base, "layers", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    checks = {
        "use_flash_attention_for_generation": getattr(cfg, "use_flash_attention_for_generation", False),
        "fuse_attention_qkv": getattr(cfg, "fuse_attention_qkv", False),
        "use_fused_rope": getattr(cfg, "use_fused_rope", False),
        "alibi": getattr(cfg, "alibi", False),
        "no rope": not getattr(cfg, "rope", True),
        "use_long_sequence_strategies": getattr(cfg, "use_long_sequence_strategies", False),
        "query heads not a multiple of key/value heads": cfg.num_attention_heads % (cfg.num_key_value_heads or cfg.num_attention_heads) != 0,
        "causal-mask environment switch": get_use_casual_mask(),
    }
    bad = common_unsupported(model, base.embed_tokens.weight.dtype) + [name for name, hit in checks.items() if hit]
    if bad:
        return ", ".join(bad)
    attn = layers[0].self_attn
    if not isinstance(attn, attention_class) or getattr(attn, "kv_indices", None) is not None \
            or getattr(attn, "reshard_layer", None) is not None:
        return "an attention layer of another kind"
    if not isinstance(attn.rotary_emb, rotary_class) or type(attn.rotary_emb).forward is not rotary_class.forward:
        # linear and llama3 scaling only change the precomputed table (read through forward); dynamic NTK does not
        return f"rotary embedding {type(attn.rotary_emb).__name__}"
    return None


class LlamaDecoder(DecodeCore):
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    BASE = "llama"  # the causal LM's attribute holding the decoder (embed_tokens, layers, norm)

    def __init__(self, model):
        model = inner(model)
        cfg = model.config
        self.model = model
        self.base = getattr(model, self.BASE)
        self.layers = list(self.base.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads  # query heads per key/value head (grouped-query attention)
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.rotary = self.layers[0].self_attn.rotary_emb  # every layer's is the same module type and table

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    # ------------------------------------------------------------------ DecodeCore hooks
    def _context(self, positions, length: int):
        """cos and sign-folded sin for positions [B, L] (cpu_kernels.rotary_tables), tiled once per forward over
        the query heads and the key/value heads: [B, L, H, D] and [B, L, KV, D]. paddle's CPU multiply is
        several times slower broadcasting [B, L, 1, D] over the heads than on same-shape operands (the same
        values: exact)."""
        # the module's own [1, length, 1, D] tables (its first argument is read for its dtype only)
        cos, sin = self.rotary(self.base.embed_tokens.weight, seq_len=length)
        return self._tile_heads(*rotary_tables(cos, sin, positions))

    def _tile_heads(self, cos, sin):
        """[B, L, 1, D] cos/sin -> (cos_q, sin_q [B, L, H, D], cos_k, sin_k [B, L, KV, D])."""
        import paddle

        return (paddle.tile(cos, [1, 1, self.heads, 1]), paddle.tile(sin, [1, 1, self.heads, 1]),
                paddle.tile(cos, [1, 1, self.kv_heads, 1]), paddle.tile(sin, [1, 1, self.kv_heads, 1]))

    def _embed(self, ids, positions):
        return self.base.embed_tokens(ids)

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        q, k, v = self._qkv(i, layer, layer.input_layernorm(hidden), *ctx)
        k, v = kv(k, v)
        return self._attend(layer, hidden, q, k, v, bias)

    def _logits(self, hidden_last):
        """[B, 1, h] last hidden state -> [B, vocab] logits."""
        return self._head(self.base.norm(hidden_last))[:, -1, :]

    def _head(self, hidden):
        """The lm_head; a tied one (transpose_y: the [vocab, h] embedding) through DecodeCore._tied_head, any
        other head (untied, LoRA, quantized, a subclass) by its own forward."""
        head = self.model.lm_head
        cls = self._head_class()
        if type(head) is cls and type(head).forward is cls.forward and head.transpose_y \
                and not head.config.sequence_parallel and head.weight.dtype == hidden.dtype:
            return self._tied_head(hidden, head.weight)
        return head(hidden)

    @staticmethod
    def _head_class():
        from paddlenlp.transformers.llama.modeling import LlamaLMHead

        return LlamaLMHead

    # ------------------------------------------------------------------ pieces
    def _qkv(self, i, layer, x, cos_q, sin_q, cos_k, sin_k):
        """q, k, v of layer i for hidden x [B, L, h]: [B, H or KV, L, D] each, rotary applied to q and k (tables
        from _context)."""
        attn = layer.self_attn
        q, k, v = self._projections(f"qkv{i}", x, (attn.q_proj, attn.k_proj, attn.v_proj), [self.heads, self.kv_heads, self.kv_heads])
        return (t.transpose([0, 2, 1, 3]) for t in (rotate(q, cos_q, sin_q), rotate(k, cos_k, sin_k), v))

    def _attend(self, layer, residual, q, k, v, mask):
        """The rest of a decoder layer after q/k/v: attention of q [B, H, Lq, D] over k/v [B, KV, K, D] with the
        additive mask [B, 1, Lq, K], o_proj, residual, post-attention norm, MLP, residual. With grouped-query
        attention the G = H / KV query heads of a key/value head (consecutive ones, as paddlenlp's repeat_kv
        pairs them) attend as one [G * Lq] block instead of repeating the cache G times."""
        import paddle
        import paddle.nn.functional as F

        b, _, lq, _ = q.shape
        if self.groups > 1:
            q = q.reshape([b, self.kv_heads, self.groups * lq, self.head_dim])
            mask = mask.tile([1, 1, self.groups, 1])
        weights = paddle.matmul(q * self.scale, k, transpose_y=True) + mask
        out = paddle.matmul(F.softmax(weights, axis=-1), v)  # [B, KV, G * Lq, D]
        if self.groups > 1:
            out = out.reshape([b, self.heads, lq, self.head_dim])
        out = out.transpose([0, 2, 1, 3]).reshape([b, lq, self.heads * self.head_dim])
        hidden = residual + layer.self_attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def static_step(model, runner_class=LlamaDecoder):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running the layers of
    `runner_class` (LlamaDecoder, Qwen2Decoder), or None where the runner does not apply. The rotary tables are the
    module's own at every position it holds (so linear / llama3 scaling are kept), gathered inside the program."""
    import paddle
    import paddle.nn.functional as F

    from .inplace_step import RunnerStep, StepHooks

    if runner_class.unsupported(model) is not None:
        return None

    class LlamaStep(StepHooks, runner_class):
        step_context = True  # the rotary tables at the positions
        join_qkv = True

        def __init__(self, model):
            super().__init__(model)
            rotary = self.rotary
            with paddle.no_grad():
                cos, sin = rotary(self.base.embed_tokens.weight, seq_len=rotary.cos_cached.shape[1])
                cos, sin = rotary_tables(cos, sin, paddle.arange(cos.shape[1]).unsqueeze(0))  # [1, length, 1, D]
            self.cos_table, self.sin_table = cos[0, :, 0, :].clone(), sin[0, :, 0, :].clone()

        def _context(self, positions, length):
            return self._tile_heads(F.embedding(positions, self.cos_table).unsqueeze(2),
                                    F.embedding(positions, self.sin_table).unsqueeze(2))

    runner = LlamaStep(model)
    return RunnerStep(runner, buffers={"cos_table": runner.cos_table, "sin_table": runner.sin_table})
