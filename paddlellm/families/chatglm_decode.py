"""ChatGLM-6B v1's decode runner (ChatGLMFamily.decode_runner): the model's own layers over a KV cache written in place.

paddlenlp's ChatGLM works sequence-first and per step concatenates every layer's key/value cache with the new
token, grows the 4-D [batch, 1, length, length] bool mask by a row and a column (generate()'s rule: the new row
is the previous last row plus the new column), rebuilds the rotary table when a position passes its length, and
runs the attention through bmm-layout transposes of the whole cache. The runner (decode_core.DecodeCore) keeps
[batch, heads, capacity, head_dim] key/value buffers, writes each new pair into its slot and attends batch-first:

- every weight-bearing piece is the model's own sublayer (word embedding, LayerNorms, query_key_value, dense,
  MLP, final LayerNorm, the lm_head's weight), so LoRA layers, quantized layers and our CPU patches act as in the model;
- 2-D rotary positions as ChatGLMAttention applies them: the first half of each head rotated by the position,
  the second by the block position, each with rotate_half, from the cos/sin table the model builds (entry
  (t, j) is cos/sin of the float32 product t * inv_freq_j, whatever the table's length);
- attention is the model's: q / (sqrt(head_dim) * (layer_id + 1)) with attention_scale, scores times
  (layer_id + 1), + 0 / finfo.min mask, softmax; the block's residuals are alpha = sqrt(2 * layers) times the
  normed input, as GLMBlock computes them;
- positions and masks follow generate() with ChatGLM's update_model_kwargs_for_generation: the position row stays
  at the mask token's, the block position + 1 per step; each step's mask row is the prompt's last row extended by
  ones (BlankInfillingMasks below).

The in-place static export (format 3) runs the same layers (static_step: RunnerStep, the rotary cos/sin computed
at the [B, 2, L] positions in the program); BlankInfillingRules / ChatGLMRules give its runner (formats/static.py)
the prompt's 4-D mask per prefill chunk and the positions' advance, as BlankInfillingMasks gives this runner.

Configurations it does not reproduce get a reason from `unsupported` (the decode loop then runs the model's own
forward): tensor parallel, flash attention, 1-D positions (position_encoding_2d False), long-sequence strategies,
a prefix encoder (pre_seq_len), training mode, non-float32 weights, a static-graph shell, a prefix-tuning wrapper.
"""
from __future__ import annotations

import math
from typing import Optional

from ..formats.static import InPlaceRules
from .decode_core import DecodeCore, common_unsupported, inner

TABLE_MIN = 64  # rows of the first rotary cos/sin table; it doubles (rebuilt whole) when a position passes its end


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import ChatGLMForCausalLM
    from paddlenlp.transformers.chatglm.modeling import ChatGLMAttention, ChatGLMBlock, RotaryEmbeddings

    lm = inner(model)
    if not isinstance(lm, ChatGLMForCausalLM):
        return f"not a ChatGLMForCausalLM ({type(lm).__name__})"
    stack = lm.chatglm.transformer
    if not getattr(stack, "layers", None):
        return "no decoder layers (a static-graph shell)"
    cfg = lm.config
    bad = common_unsupported(lm, stack.word_embeddings.weight.dtype)
    bad += [name for name, hit in {
        "position_encoding_2d False": not cfg.position_encoding_2d,
        "use_long_sequence_strategies": getattr(cfg, "use_long_sequence_strategies", False),
        "pre_seq_len (a prefix encoder)": cfg.pre_seq_len is not None,
    }.items() if hit]
    if bad:
        return ", ".join(bad)
    if not all(type(b) is ChatGLMBlock and type(b.attention) is ChatGLMAttention for b in stack.layers):
        return "a decoder layer of another kind"
    if type(stack.rotary_embeddings) is not RotaryEmbeddings:
        return f"rotary embedding {type(stack.rotary_embeddings).__name__}"
    return None


class BlankInfillingMasks:
    """The prompt's 4-D mask and [B, 2, L] positions of a prefix LM (ChatGLM v1, GLM) in DecodeCore's hooks.

    The prompt runs under its own 4-D mask (bidirectional context, causal span, padding that attends itself),
    chunk by chunk; every later step attends what the prompt's last row attends plus the tokens generated so far
    (generate()'s mask update copies the last row and opens the new column), which is DecodeCore's 2-D `keep`.
    The positions the core carries are ("prefill", positions [n, 2, span], mask [n, span, span]) for a prefill
    chunk and the family's step state otherwise; `_context` turns either into what `_layer` reads, including the
    chunk's own attention bias for the prefill.
    """

    def _keep_mask(self, inputs):
        mask = inputs.get("attention_mask")
        if mask is None or len(mask.shape) != 4:
            raise ValueError(f"the {type(self).__name__} decode runner takes a [batch, 1, length, length] attention mask")
        self.prompt_mask = mask[:, 0].astype("bool")  # [B, L, L]
        return self.prompt_mask[:, -1, :].astype("int64")  # what the prompt's last position (and every step) attends

    def _positions(self, inputs, keep):
        positions = inputs.get("position_ids")
        if positions is None or len(positions.shape) != 3:
            raise ValueError(f"the {type(self).__name__} decode runner takes [batch, 2, length] position_ids")
        return positions

    def _pick_positions(self, positions, pick, cols):
        mask = pick(self.prompt_mask)
        if cols.start and bool(mask[:, cols.start:, : cols.start].any()):
            # the chunk skips the columns before its longest prompt; a mask that attends them is not reproduced
            raise ValueError(f"the {type(self).__name__} decode runner takes masks whose rows attend no column before the "
                             "last row's first attended one")
        return ("prefill", pick(positions)[:, :, cols], mask[:, cols, cols])

    def _prefill_allowed(self, keep, span: int):
        return keep[:, None, None, :]  # not read: a chunk's bias comes from its own 4-D mask (_context)


class ChatGLMDecoder(BlankInfillingMasks, DecodeCore):
    """ChatGLM v1 runner: full multi-head attention, 2-D rotary positions, alpha-scaled residuals."""

    def __init__(self, model):
        lm = inner(model)
        cfg = lm.config
        self.model = lm
        self.stack = lm.chatglm.transformer
        self.layers = list(self.stack.layers)
        attn = self.layers[0].attention
        self.kv_heads = self.heads = attn.num_attention_heads
        self.head_dim = attn.attention_head_size
        self.attention_scale = attn.attention_scale
        self.alpha = (2 * cfg.num_hidden_layers) ** 0.5
        self.inv_freq = self.stack.rotary_embeddings.inv_freq
        self.table_len = 0

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    # ------------------------------------------------------------------ positions
    def _last_positions(self, positions):
        return positions[:, :, -1:]

    def _advance(self, last):
        import paddle

        return last + paddle.to_tensor([[[0], [1]]], dtype=last.dtype)  # the block position moves, the position stays

    def _tables(self, upto: int):
        """cos/sin [upto, D / 2] as RotaryEmbeddings builds them (t * inv_freq in float32, duplicated)."""
        import paddle

        if upto > self.table_len:
            self.table_len = max(upto, 2 * self.table_len, TABLE_MIN)
            t = paddle.arange(start=0, end=self.table_len, dtype="float32")
            emb = paddle.einsum("i,j->ij", t, self.inv_freq)
            emb = paddle.concat([emb, emb], axis=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos, self.sin

    def _context(self, positions, length: int):
        """{"rot": [(cos, sin) at the positions, (cos, sin) at the block positions], each [B, L, 1, D / 2];
        "bias": a prefill chunk's additive mask [n, 1, span, span] (None at a step: the core's bias)}."""
        bias = None
        if isinstance(positions, tuple):
            _, positions, allowed = positions
            bias = self._bias(allowed.unsqueeze(1), None)
        cos, sin = self._tables(int(positions.max()) + 1)
        rot = [(cos[positions[:, r]].unsqueeze(2), sin[positions[:, r]].unsqueeze(2)) for r in (0, 1)]
        return {"rot": rot, "bias": bias}

    def _embed(self, ids, positions):
        return self.stack.word_embeddings(ids)

    # ------------------------------------------------------------------ layers
    @staticmethod
    def _rotate(x, cos, sin):
        import paddle

        x1, x2 = paddle.chunk(x, 2, axis=-1)
        return x * cos + paddle.concat([-x2, x1], axis=-1) * sin

    def _layer(self, i, layer, hidden, ctx, bias, kv):
        import paddle
        import paddle.nn.functional as F

        attn = layer.attention
        bias = ctx["bias"] if ctx["bias"] is not None else bias
        normed = layer.input_layernorm(hidden)
        # reshape's 0 keeps the batch/length dims (dynamic in the static step program: static_step)
        mixed = attn.query_key_value(normed).reshape([0, 0, self.heads, 3 * self.head_dim])
        q, k, v = paddle.split(mixed, 3, axis=-1)
        (pcos, psin), (bcos, bsin) = ctx["rot"]
        q1, q2 = paddle.chunk(q, 2, axis=-1)
        k1, k2 = paddle.chunk(k, 2, axis=-1)
        q = paddle.concat([self._rotate(q1, pcos, psin), self._rotate(q2, bcos, bsin)], axis=-1)
        k = paddle.concat([self._rotate(k1, pcos, psin), self._rotate(k2, bcos, bsin)], axis=-1)
        coeff = float(layer.layer_id) + 1.0
        if self.attention_scale:
            q = q / (math.sqrt(self.head_dim) * coeff)
        k, v = kv(k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3]))
        scores = paddle.matmul(q.transpose([0, 2, 1, 3]), k, transpose_y=True) * coeff
        out = paddle.matmul(F.softmax(scores + bias, axis=-1), v)
        out = attn.dense(out.transpose([0, 2, 1, 3]).reshape([0, 0, self.heads * self.head_dim]))
        hidden = self.alpha * normed + out
        normed = layer.post_attention_layernorm(hidden)
        return normed * self.alpha + layer.mlp(normed)

    def _logits(self, hidden_last):
        import paddle
        from paddlenlp.transformers.chatglm.modeling import ChatGLMHead

        hidden = self.stack.final_layernorm(hidden_last)
        head = self.model.lm_head
        if type(head) is ChatGLMHead:
            # ChatGLMHead's F.linear(h, weight.T) as one product with the weight read transposed: the same sums
            # without copying the [vocab, hidden] weight (paddle's .T is a dense copy while generating) every step
            return paddle.matmul(hidden, head.decoder_weight, transpose_y=True)[:, -1, :]
        return head(hidden)[:, -1, :].astype("float32")


class BlankInfillingRules(InPlaceRules):
    """BlankInfillingMasks' rules for the runner of an in-place static export (formats/static.InPlaceRunner, via
    Family.static_rules): each prefill chunk runs under its rows of the prompt's 4-D mask, every step attends what
    the prompt's last row attends plus the tokens generated so far; positions are [B, 2, L]. Subclasses say how
    the positions advance (ChatGLMRules, glm_decode.GLMRules)."""

    def prompt(self, inputs, batch: int, length: int):
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        if mask is None or len(mask.shape) != 4 or tuple(mask.shape[2:]) != (length, length):
            raise ValueError("the in-place static runner of a prefix LM takes the prompt's [batch, 1, length, length] attention mask")
        if positions is None or len(positions.shape) != 3:
            raise ValueError("the in-place static runner of a prefix LM takes [batch, 2, length] position_ids")
        return mask[:, 0, -1, :].astype("bool"), positions

    def chunk(self, inputs, keep, positions, pick, start: int):
        mask = pick(inputs["attention_mask"][:, 0].astype("bool"))  # [n, L, L]
        if start and bool(mask[:, start:, :start].any()):  # as BlankInfillingMasks._pick_positions: those slots hold no keys
            raise ValueError("the in-place static runner takes masks whose rows attend no column before the last row's first "
                             "attended one")
        return mask[:, start:, :], pick(positions)[:, :, start:keep.shape[1]]  # GLM's hold later columns too

    def forward_inputs(self, attention_mask, position_ids, batch: int, done: int, length: int):
        if attention_mask is None or len(attention_mask.shape) != 4 or tuple(attention_mask.shape[2:]) != (length, done + length):
            raise ValueError("the in-place static forward of a prefix LM takes a [batch, 1, length, past + length] attention mask")
        if position_ids is None or len(position_ids.shape) != 3:
            raise ValueError("the in-place static forward of a prefix LM takes [batch, 2, length] position_ids")
        return attention_mask[:, 0].astype("bool"), position_ids


class ChatGLMRules(BlankInfillingRules):
    """ChatGLM v1: the position stays at the mask token's, the block position + 1 per step (ChatGLMDecoder._advance);
    the model forward returns its cache wrapped in a 1-tuple (prepare_inputs_for_generation reads cache[-1])."""

    def last(self, positions, length: int):
        return positions[:, :, -1:]

    def advance(self, state):
        import paddle

        state = state + paddle.to_tensor([[[0], [1]]], dtype=state.dtype)
        return state, state

    def forward_output(self, logits, cache):
        return logits, (cache,)


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    from .inplace_step import RunnerStep, StepHooks

    class ChatGLMStep(StepHooks, ChatGLMDecoder):
        step_context = True  # the rotary cos/sin at the positions
        positions_spec = [None, 2, None]

        def _context(self, positions, length):
            """_context's rotary values computed at the [B, 2, L] positions in the program: cos/sin of the same
            float32 products t * inv_freq_j as the runner's table entries (no table, so no length limit)."""
            import paddle

            t = positions.astype("float32").unsqueeze(-1) * self.inv_freq  # [B, 2, L, D / 4]
            emb = paddle.concat([t, t], axis=-1)
            cos, sin = emb.cos(), emb.sin()
            return {"rot": [(cos[:, r].unsqueeze(2), sin[:, r].unsqueeze(2)) for r in (0, 1)], "bias": None}

    if unsupported(model) is not None:
        return None
    runner = ChatGLMStep(model)
    return RunnerStep(runner, buffers={"rotary_inv_freq": runner.inv_freq})
