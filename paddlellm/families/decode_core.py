"""The family-independent part of a decode runner: a KV cache written in place, prompts prefilled in chunks.

paddlenlp's models keep their KV cache as tensors that every decode step grows by concatenation (and some
transpose it again before attending): several copies of every layer's whole cache per step, which at batch 32 x
300 cached tokens was most of the step's time. A runner computes the same thing with the cache preallocated
once per batch as [batch, kv_heads, capacity, head_dim] per layer, key and value, and each new key/value written
into its slot. `DecodeCore` holds everything that does not depend on the family:

- the cache holds the prompt plus KV_GROW slots at first and grows (one copy) when they are used up, up to the
  capacity asked for, so a batch that stops early never holds a cache for max_new_tokens;
- the prompt is run in chunks of rows of similar length (prefill_chunks: at most PREFILL_ROWS rows, each at
  least PREFILL_FILL of the chunk's longest prompt), each over its own longest prompt only, so the padding of a
  mixed-length batch is not computed; only the last position's logits are kept;
- positions and masks follow paddlenlp's generation rules: left padding (a padding hole inside a row is masked
  like any padding), the positions of the last prompt column + 1 per step, every row's mask extended by one
  each step; slots not written yet are masked like padding, so their softmax weight is exactly 0.

API (a family's runner subclasses DecodeCore; see llama_decode.py, gpt_decode.py, opt_decode.py, bloom_decode.py):

  Public:  cls.unsupported(model) -> reason or None      (staticmethod each family defines)
           cls.for_model(model) -> runner or None        (None when unsupported: the model's own forward is used)
           runner.prefill(inputs, capacity) -> [B, vocab] logits of the prompt's last position; inputs as
                                                 generate() receives them (input_ids, attention_mask, position_ids)
           runner.step(tokens [B, 1]) -> [B, vocab] next logits
  __init__(model): the subclass sets self.model (the causal LM, LoRA unwrapped: `inner(model)`), self.layers (the
           decoder layers, a list), self.kv_heads and self.head_dim (the cache's [B, kv_heads, capacity, head_dim]).
  Hooks (defaults in brackets):
    _keep_mask(inputs) -> [B, L] int 0/1 mask of attended prompt columns  [inputs' 2-D attention_mask, or ones]
    _positions(inputs, keep) -> [B, L] positions              [inputs' position_ids, or arange]
    _pick_positions(positions, pick, cols) -> positions of a chunk's rows (pick(t) gathers rows) and columns
                                                              [pick(positions)[:, cols]]
    _last_positions(positions) -> what a step advances from   [positions[:, -1:]]
    _advance(last) -> the next step's positions               [last + 1]
    _context(positions, length) -> per-forward values the layers share (rotary tables, ...)  [None]
           length: the number of columns so far (prefill: the prompt's, step: slot + 1)
    _prefill_allowed(keep [n, span] bool, span) -> [n, 1, span, span] bool: which keys a chunk's queries attend
                                                              [causal & keep]
    _bias(allowed [B, 1, Lq, K] bool, keep [B, K] int) -> additive attention bias broadcastable to [B, H, Lq, K]
           [0 where allowed, finfo(float32).min elsewhere]; keep is the 0/1 mask of the same K key columns
           (from a row's first column on, so a cumsum over it counts the row's attended tokens: Bloom's ALiBi)
    _embed(ids [B, L], positions) -> hidden [B, L, h]
    _layer(i, layer, hidden, ctx, bias, kv) -> hidden: one decoder layer. It computes its new k, v as
           [B, kv_heads, L, head_dim] and calls `k, v = kv(k, v)`, which stores them in the cache and returns the
           keys/values to attend over (prefill: the chunk's own; step: the whole cache, slot written); bias masks
           exactly those keys. `self._attention(q, k, v, bias, scale)` is the usual softmax attention helper.
    _logits(hidden_last [B, 1, h]) -> [B, vocab]
  Helper: self._projections(key, x, linears, heads) -> [B, L, n, D] per linear (q/k/v; _head_projections: [B, n, L, D]):
           the in-place static step computes the group as one product over weights joined at export (key: unique per
           layer)
  Helper: self._tied_head(hidden, weight) -> hidden @ weight^T for a [vocab, h] output weight (tied embeddings),
           for _logits: at batch 1 in the steps, with >= HEAD_COPY_MIN tokens still to come, on the runner's own
           [h, vocab] copy (paddle's CPU matrix-vector product on the transposed weight is ~2x slower).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..cpu_kernels import PREFILL_FILL, PREFILL_ROWS, prefill_chunks  # noqa: F401 (shared with formats/static.py's runner)

HEAD_COPY_MIN = 32  # _tied_head: the [h, vocab] copy is made only when at least this many tokens may still come
KV_GROW = 64  # the cache starts at prompt + this many slots (at most the capacity asked) and grows by at least as many


def inner(model):
    """The causal LM inside a LoRA wrapper (or the model itself)."""
    from paddlenlp.peft import LoRAModel

    return model.model if isinstance(model, LoRAModel) else model


def common_unsupported(inner_model, dtype) -> List[str]:
    """Reasons shared by every family: parallel degrees, training mode, non-float32 weights (dtype: the
    embedding's)."""
    import paddle

    cfg = inner_model.config
    checks = {
        "tensor_parallel_degree > 1": getattr(cfg, "tensor_parallel_degree", 1) > 1,
        "sequence_parallel": getattr(cfg, "sequence_parallel", False),
        "context_parallel_degree > 1": getattr(cfg, "context_parallel_degree", 1) > 1,
        "sep_parallel_degree > 1": getattr(cfg, "sep_parallel_degree", 1) > 1,
        "use_flash_attention": getattr(cfg, "use_flash_attention", False),
        "training mode": inner_model.training,
        "weights not float32": dtype != paddle.float32,
    }
    return [name for name, hit in checks.items() if hit]


class DecodeCore:
    """prefill(inputs, capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens) -> the next."""

    model = None
    layers: list = []
    kv_heads = 0
    head_dim = 0
    _head_t = None  # _tied_head's [h, vocab] copy of the output weight, for this runner's batch
    _stepping = False  # True in step(): the prompt's pass never makes the copy

    @staticmethod
    def unsupported(model) -> Optional[str]:
        raise NotImplementedError

    @classmethod
    def for_model(cls, model):
        return None if cls.unsupported(model) is not None else cls(model)

    # ------------------------------------------------------------------ hooks
    def _keep_mask(self, inputs):
        import paddle

        mask = inputs.get("attention_mask")
        if mask is None:
            batch, length = inputs["input_ids"].shape
            return paddle.ones([batch, length], dtype="int64")
        if len(mask.shape) != 2:
            raise ValueError(f"the {type(self).__name__} decode runner takes a [batch, length] attention mask")
        return mask

    def _positions(self, inputs, keep):
        import paddle

        positions = inputs.get("position_ids")
        if positions is None:  # as prepare_inputs_for_generation without position_ids
            batch, length = inputs["input_ids"].shape
            positions = paddle.arange(length).expand((batch, length))
        return positions

    def _pick_positions(self, positions, pick, cols):
        return pick(positions)[:, cols]

    def _last_positions(self, positions):
        return positions[:, -1:]

    def _advance(self, last):
        return last + 1

    def _context(self, positions, length: int):
        return None

    def _prefill_allowed(self, keep, span: int):
        import paddle

        causal = paddle.tril(paddle.ones([span, span], dtype="bool"))
        return keep[:, None, None, :] & causal[None, None]

    def _bias(self, allowed, keep):
        import paddle

        return paddle.where(allowed, paddle.zeros([1]), paddle.full([1], paddle.finfo(paddle.float32).min))

    def _embed(self, ids, positions):
        raise NotImplementedError

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        raise NotImplementedError

    def _logits(self, hidden_last):
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _attention(q, k, v, bias, scale: float):
        """softmax(q * scale @ k^T + bias) @ v for q [B, H, Lq, D], k/v [B, H, K, D] -> [B, Lq, H * D]."""
        import paddle
        import paddle.nn.functional as F

        b, h, lq, d = q.shape
        weights = paddle.matmul(q * scale, k, transpose_y=True) + bias
        out = paddle.matmul(F.softmax(weights, axis=-1), v)
        return out.transpose([0, 2, 1, 3]).reshape([b, lq, h * d])

    def _attend(self, q, k, v, bias):
        """softmax(self._score(q, k) + bias) @ v for q [B, H, Lq, D], k/v [B, H, K, D] -> [B, Lq, H * D] (GPT, OPT,
        Bloom's and ChatGLM2's runners, and their in-place static step programs)."""
        import paddle
        import paddle.nn.functional as F

        out = paddle.matmul(F.softmax(self._score(q, k) + bias, axis=-1), v)
        return self._merge_heads(out)

    def _merge_heads(self, out):
        """The attention output [B, H, Lq, D] -> [B, Lq, H * D] (hook: ChatGLM2's query rows are [B, groups, G * Lq, D])."""
        return out.transpose([0, 2, 1, 3]).reshape([0, 0, self.heads * self.head_dim])

    def _score(self, q, k):
        """The attention scores before the bias, [B, H, Lq, K] (for _attend)."""
        raise NotImplementedError

    def _projections(self, key: str, x, linears, heads):
        """The projections of x [B, L, h] by `linears` (q, k, v), each split into its number of `heads` (a list) of
        head_dim: [B, L, heads, D] each. Hook: the in-place static step program computes such a group as one product
        over weights joined at export (inplace_step.StepHooks); `key` names the group (unique per layer)."""
        return [linear(x).reshape([0, 0, n, self.head_dim]) for linear, n in zip(linears, heads)]

    def _head_projections(self, key: str, x, linears, heads):
        """_projections with the heads first: [B, heads, L, D] each."""
        return [t.transpose([0, 2, 1, 3]) for t in self._projections(key, x, linears, heads)]

    def _tied_head(self, hidden, weight):
        """hidden [B, L, h] @ weight^T for a [vocab, h] output weight (the tied embedding) -> [B, L, vocab].

        paddle's CPU matmul (MKL, one thread) on the transposed weight at batch 1 is a matrix-vector product about
        2x slower than on a [h, vocab] one (vocab 49152 x 576: 7.9 against 3.7 ms); from batch 2 on the
        transposed product is as fast or faster (batch 8: 19 against 24 ms). So a batch-1 runner with at least
        HEAD_COPY_MIN tokens still to come makes that [h, vocab] copy at its first step (one copy of the output
        weight while the batch runs; ~70 ms once) and uses it for every step: the same product up to float
        rounding (summation order). Anything else: the transposed product, as the model's heads compute it."""
        import paddle

        if self._head_t is None:
            if not self._stepping or hidden.shape[0] != 1 or self.max_capacity - self.next_slot < HEAD_COPY_MIN:
                return paddle.matmul(hidden, weight, transpose_y=True)
            self._head_t = weight.t().contiguous()
        return paddle.matmul(hidden, self._head_t)

    # ------------------------------------------------------------------ generation
    def prefill(self, inputs: Dict, capacity: int):
        """Run the left-padded prompt and allocate the cache for `capacity` tokens in all; returns the last
        position's logits [B, vocab]."""
        import numpy as np
        import paddle

        ids = inputs["input_ids"]
        batch, length = ids.shape
        self._head_t, self._stepping = None, False
        keep = self._keep_mask(inputs).astype("int64")
        positions = self._positions(inputs, keep)
        self.max_capacity = capacity
        capacity = min(capacity, length + KV_GROW)
        # 0/1 mask over [B, capacity]: 1 where attended; padding and slots not written yet 0
        self.keep = paddle.concat([keep, paddle.zeros([batch, capacity - length], dtype="int64")], axis=1)
        self.next_slot = length
        self.positions = self._last_positions(positions)
        self.capacity = capacity

        real = keep.numpy().astype(bool)
        first = np.where(real.any(1), real.argmax(1), length)  # first attended column per row (left padding)
        chunks = prefill_chunks(length - first)
        pad = capacity - length  # free slots after the prompt, zero in every chunk's cache
        caches: List[List] = [[] for _ in self.layers]
        logits = []
        with paddle.no_grad():
            for rows in chunks:
                start = min(int(first[rows].min()), length - 1)  # every row has its last column (left padding)
                sel = paddle.to_tensor(rows) if len(chunks) > 1 else None
                pick = (lambda t: paddle.gather(t, sel)) if sel is not None else (lambda t: t)
                cols = slice(start, length)
                n, span = len(rows), length - start
                chunk_keep = pick(keep)[:, cols]
                bias = self._bias(self._prefill_allowed(chunk_keep.astype("bool"), span), chunk_keep)
                chunk_positions = self._pick_positions(positions, pick, cols)
                ctx = self._context(chunk_positions, length)
                hidden = self._embed(pick(ids)[:, cols], chunk_positions)
                for i, layer in enumerate(self.layers):
                    def kv(k, v, i=i):
                        caches[i].append([paddle.concat([paddle.zeros([n, self.kv_heads, start, self.head_dim]), t,
                                                         paddle.zeros([n, self.kv_heads, pad, self.head_dim])], axis=2)
                                          if start or pad else t for t in (k, v)])
                        return k, v

                    hidden = self._layer(i, layer, hidden, ctx, bias, kv)
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
        batch = self.keep.shape[0]
        self.keep = paddle.concat([self.keep, paddle.zeros([batch, extra], dtype="int64")], axis=1)
        zeros = paddle.zeros([batch, self.kv_heads, extra, self.head_dim])
        self.cache = [[paddle.concat([t, zeros], axis=2) for t in kv] for kv in self.cache]
        self.capacity = capacity

    def step(self, tokens):
        """Feed one token per row ([B, 1] ids); returns the next logits [B, vocab]."""
        import paddle

        slot = self.next_slot
        self._stepping = True
        if slot >= self.capacity:
            if self.capacity >= self.max_capacity:
                raise ValueError(f"the KV cache holds {self.max_capacity} tokens; more were fed")
            self._grow(min(self.max_capacity, self.capacity + max(KV_GROW, self.capacity // 2)))
        self.next_slot += 1
        self.positions = self._advance(self.positions)
        self.keep[:, slot] = 1  # generate() extends every row's mask by one each step
        batch = tokens.shape[0]
        bias = self._bias(self.keep.astype("bool").reshape([batch, 1, 1, self.capacity]), self.keep)
        ctx = self._context(self.positions, slot + 1)
        with paddle.no_grad():
            hidden = self._embed(tokens, self.positions)
            for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, self.cache)):
                def kv(k, v, k_cache=k_cache, v_cache=v_cache):
                    k_cache[:, :, slot:slot + 1, :] = k
                    v_cache[:, :, slot:slot + 1, :] = v
                    return k_cache, v_cache

                hidden = self._layer(i, layer, hidden, ctx, bias, kv)
            return self._logits(hidden)
