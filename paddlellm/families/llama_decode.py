"""LLaMA's decode runner: the model's own layers driven with a KV cache written in place (LlamaFamily.decode_runner).

paddlenlp's LLaMA keeps its KV cache as [batch, length, heads, head_dim] tensors that every decode step
grows by concatenation, then transposes (one copy for values, two for keys) before attending: five copies
of every layer's whole cache per step, which at batch 32 x 300 cached tokens was most of the step's time.
This runner computes the same thing with the cache preallocated once per batch as [batch, heads,
capacity, head_dim] and each new key/value written into its slot:

- every weight-bearing piece is the model's own sublayer (embedding, RMSNorms, q/k/v/o projections, MLP,
  final norm, lm_head), so LoRA layers, quantized layers and our CPU patches act as they do in the model;
- attention is paddlenlp's formula (q * 1/sqrt(d) against k, + additive mask of 0 / finfo.min, softmax, times
  v) over the whole capacity: slots not written yet are masked like padding, so their weight is exactly 0;
- positions, masks and rotary tables follow paddlenlp's generation rules (left padding, position_ids from
  the inputs then +1 per step, every row's mask extended by one each step, the rotary module's own cos/sin);
- the cache holds the prompt plus KV_GROW slots at first and grows (one copy) when they are used up, up to the
  capacity asked for, so a batch that stops early never holds a cache for max_new_tokens;
- the prompt is run in chunks of rows of similar length, each over its own longest prompt only, so the
  padding of a mixed-length batch is not computed (only the last position's logits are kept).

The tokens are those of paddlenlp's generate() (tests/test_decode_loop.py: greedy and seeded sampling, every
family); logits agree within float rounding (tests/test_llama_decode.py). Configurations it does not
reproduce (fused qkv, alibi, tensor/sequence/context parallel, flash attention,
fused rope, long-sequence strategies, non-float32 weights, a static-graph shell) get None from for_model,
and the decode loop drives the model through its own forward instead.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

PREFILL_ROWS = 8  # most rows per prefill chunk: rows are grouped by prompt length, each chunk runs over its own longest
PREFILL_FILL = 0.75  # a row joins the current chunk only if it is at least this share of the chunk's longest prompt
KV_GROW = 64  # the cache starts at prompt + this many slots (at most the capacity asked) and grows by at least as many


def _inner(model):
    """The LlamaForCausalLM inside a LoRA wrapper (or the model itself)."""
    from paddlenlp.peft import LoRAModel

    return model.model if isinstance(model, LoRAModel) else model


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import LlamaForCausalLM
    from paddlenlp.transformers.llama.modeling import LlamaAttention, LlamaRotaryEmbedding

    inner = _inner(model)
    if not isinstance(inner, LlamaForCausalLM):
        return f"not a LlamaForCausalLM ({type(inner).__name__})"
    return unsupported_layers(inner, inner.llama, LlamaAttention, LlamaRotaryEmbedding)


def unsupported_layers(inner, base, attention_class, rotary_class) -> Optional[str]:
    """Why the runner can't drive causal LM `inner` whose decoder is `base` (layers of attention_class with a rotary
    module of rotary_class: LLaMA's, or Qwen2's of the same design), or None when it can."""
    import paddle
    from paddlenlp.transformers.llama.modeling import get_use_casual_mask  # Qwen2's model reads the same switch

    cfg = inner.config
    layers = getattr(base, "layers", None)
    if not layers:
        return "no decoder layers (a static-graph shell)"
    checks = {
        "tensor_parallel_degree > 1": cfg.tensor_parallel_degree > 1,
        "sequence_parallel": getattr(cfg, "sequence_parallel", False),
        "context_parallel_degree > 1": getattr(cfg, "context_parallel_degree", 1) > 1,
        "sep_parallel_degree > 1": getattr(cfg, "sep_parallel_degree", 1) > 1,
        "use_flash_attention": getattr(cfg, "use_flash_attention", False),
        "use_flash_attention_for_generation": getattr(cfg, "use_flash_attention_for_generation", False),
        "fuse_attention_qkv": getattr(cfg, "fuse_attention_qkv", False),
        "use_fused_rope": getattr(cfg, "use_fused_rope", False),
        "alibi": getattr(cfg, "alibi", False),
        "no rope": not getattr(cfg, "rope", True),
        "use_long_sequence_strategies": getattr(cfg, "use_long_sequence_strategies", False),
        "query heads not a multiple of key/value heads": cfg.num_attention_heads % (cfg.num_key_value_heads or cfg.num_attention_heads) != 0,
        "causal-mask environment switch": get_use_casual_mask(),
        "training mode": inner.training,
    }
    bad = [name for name, hit in checks.items() if hit]
    if bad:
        return ", ".join(bad)
    attn = layers[0].self_attn
    if not isinstance(attn, attention_class) or getattr(attn, "kv_indices", None) is not None \
            or getattr(attn, "reshard_layer", None) is not None:
        return "an attention layer of another kind"
    if not isinstance(attn.rotary_emb, rotary_class) or type(attn.rotary_emb).forward is not rotary_class.forward:
        # linear and llama3 scaling only change the precomputed table (read through forward); dynamic NTK does not
        return f"rotary embedding {type(attn.rotary_emb).__name__}"
    if base.embed_tokens.weight.dtype != paddle.float32:
        return "weights not float32"
    return None


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


class LlamaDecoder:
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    BASE = "llama"  # the causal LM's attribute holding the decoder (embed_tokens, layers, norm)

    def __init__(self, model):
        inner = _inner(model)
        cfg = inner.config
        self.model = inner
        self.base = getattr(inner, self.BASE)
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

    @classmethod
    def for_model(cls, model) -> Optional["LlamaDecoder"]:
        return None if cls.unsupported(model) is not None else cls(model)

    # ------------------------------------------------------------------ pieces
    def _rotary(self, positions, length: int):
        """cos and sign-folded sin for positions [B, L] -> [B, L, 1, D] (cpu_kernels.rotary_tables)."""
        from ..cpu_kernels import rotary_tables

        # the module's own [1, length, 1, D] tables (its first argument is read for its dtype only)
        cos, sin = self.rotary(self.base.embed_tokens.weight, seq_len=length)
        return rotary_tables(cos, sin, positions)

    def _qkv(self, layer, x, cos, sin):
        """q, k, v of layer for hidden x [B, L, h]: [B, H or KV, L, D] each, rotary applied to q and k."""
        from ..cpu_kernels import rotate

        attn = layer.self_attn
        q = rotate(attn.q_proj(x).reshape([0, 0, self.heads, self.head_dim]), cos, sin)
        k = rotate(attn.k_proj(x).reshape([0, 0, self.kv_heads, self.head_dim]), cos, sin)
        v = attn.v_proj(x).reshape([0, 0, self.kv_heads, self.head_dim])
        return (t.transpose([0, 2, 1, 3]) for t in (q, k, v))

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

    def _logits(self, hidden_last):
        """[B, 1, h] last hidden state -> [B, vocab] logits."""
        return self.model.lm_head(self.base.norm(hidden_last))[:, -1, :]

    # ------------------------------------------------------------------ generation
    def prefill(self, inputs: Dict, capacity: int):
        """Run the left-padded prompt (input_ids, attention_mask, position_ids as generate() receives them) and
        allocate the cache for `capacity` tokens in all; returns the last position's logits [B, vocab]."""
        import numpy as np
        import paddle

        ids = inputs["input_ids"]
        batch, length = ids.shape
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = paddle.ones([batch, length], dtype="int64")
        if len(mask.shape) != 2:
            raise ValueError("the LLaMA decode runner takes a [batch, length] attention mask")
        positions = inputs.get("position_ids")
        if positions is None:  # as LlamaForCausalLM.prepare_inputs_for_generation
            positions = paddle.arange(length).expand((batch, length))
        keep = mask.astype("bool")
        minimum = paddle.finfo(paddle.float32).min
        self.max_capacity = capacity
        capacity = min(capacity, length + KV_GROW)
        # additive [B, capacity] mask: 0 where attended, finfo.min at padding and at slots not written yet
        self.mask = paddle.full([batch, capacity], minimum, dtype="float32")
        self.mask[:, :length] = paddle.where(keep, paddle.zeros([batch, length]), paddle.full([batch, length], minimum))
        self.next_slot = length
        self.positions = positions[:, -1:]
        self.capacity = capacity

        real = mask.numpy().astype(bool)
        first = np.where(real.any(1), real.argmax(1), length)  # first attended column per row (left padding)
        chunks = prefill_chunks(length - first)
        pad = capacity - length  # free slots after the prompt, zero in every chunk's cache
        cos_all, sin_all = self._rotary(positions, length)
        caches: List[List] = [[] for _ in self.layers]
        logits = []
        with paddle.no_grad():
            for rows in chunks:
                start = min(int(first[rows].min()), length - 1)  # every row has its last column (left padding)
                sel = paddle.to_tensor(rows) if len(chunks) > 1 else None
                pick = (lambda t: paddle.gather(t, sel)) if sel is not None else (lambda t: t)
                cols = slice(start, length)
                n, span = len(rows), length - start
                causal = paddle.tril(paddle.ones([span, span], dtype="bool"))
                allowed = pick(mask)[:, cols].astype("bool")[:, None, None, :] & causal[None, None]
                chunk_mask = paddle.where(allowed, paddle.zeros([1]), paddle.full([1], minimum))
                cos, sin = pick(cos_all)[:, cols], pick(sin_all)[:, cols]
                hidden = self.base.embed_tokens(pick(ids)[:, cols])
                for i, layer in enumerate(self.layers):
                    q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
                    hidden = self._attend(layer, hidden, q, k, v, chunk_mask)
                    kv = [paddle.concat([paddle.zeros([n, self.kv_heads, start, self.head_dim]), t,
                                         paddle.zeros([n, self.kv_heads, pad, self.head_dim])], axis=2) if start or pad else t
                          for t in (k, v)]
                    caches[i].append(kv)
                logits.append(self._logits(hidden[:, -1:]))
            if len(chunks) > 1:
                back = paddle.to_tensor(np.argsort(np.concatenate(chunks)))
                self.cache = [[paddle.gather(paddle.concat([c[j] for c in layer_chunks]), back) for j in (0, 1)]
                              for layer_chunks in caches]
                return paddle.gather(paddle.concat(logits), back)
            self.cache = [list(layer_chunks[0]) for layer_chunks in caches]
            return logits[0]

    def _grow(self, capacity: int) -> None:
        """Copy the cache and mask into room for `capacity` tokens (new slots masked like padding)."""
        import paddle

        extra = capacity - self.capacity
        batch = self.mask.shape[0]
        self.mask = paddle.concat([self.mask, paddle.full([batch, extra], paddle.finfo(paddle.float32).min, dtype="float32")], axis=1)
        zeros = paddle.zeros([batch, self.kv_heads, extra, self.head_dim])
        self.cache = [[paddle.concat([t, zeros], axis=2) for t in kv] for kv in self.cache]
        self.capacity = capacity

    def step(self, tokens):
        """Feed one token per row ([B, 1] ids); returns the next logits [B, vocab]."""
        import paddle

        slot = self.next_slot
        if slot >= self.capacity:
            if self.capacity >= self.max_capacity:
                raise ValueError(f"the KV cache holds {self.max_capacity} tokens; more were fed")
            self._grow(min(self.max_capacity, self.capacity + max(KV_GROW, self.capacity // 2)))
        self.next_slot += 1
        self.positions = self.positions + 1
        self.mask[:, slot] = 0.0  # generate() extends every row's mask by one each step
        batch = tokens.shape[0]
        mask = self.mask.reshape([batch, 1, 1, self.capacity])
        cos, sin = self._rotary(self.positions, slot + 1)
        with paddle.no_grad():
            hidden = self.base.embed_tokens(tokens)
            for layer, (k_cache, v_cache) in zip(self.layers, self.cache):
                q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
                k_cache[:, :, slot:slot + 1, :] = k
                v_cache[:, :, slot:slot + 1, :] = v
                hidden = self._attend(layer, hidden, q, k_cache, v_cache, mask)
            return self._logits(hidden)
