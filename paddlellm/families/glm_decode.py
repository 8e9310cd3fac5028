"""GLM's decode runner (GLMFamily.decode_runner): the model's own layers over a key/value cache written in place.

paddlenlp's GLM caches each layer's *input hidden states* (Transformer-XL memories), not keys and values: every
decode step concatenates the new token to every layer's memory, then runs input_layernorm and the fused
query_key_value projection over the whole memory again (3 * hidden^2 multiply-adds per cached token per layer per
step: most of a step's time), only to keep the new query row. Keys and values are per-token functions of the
memory, so a cache of them gives the same attention without that work; a preallocated in-place *memory* buffer
would save only the concatenation, so this runner caches keys and values (decode_core.DecodeCore: [batch, heads,
capacity, head_dim] each, the keys already divided by sqrt(head_dim) as the model divides them before the product)
and computes each step's projection for the new token only:

- every weight-bearing piece is the model's own sublayer (word, position and block-position embeddings,
  LayerNorms, query_key_value, dense, MLP, final LayerNorm; logits against the word embedding as GLMModel takes
  them, read transposed by the product instead of copied transposed each step), so LoRA layers, quantized layers and our CPU patches act as in the model;
- attention is GLMAttention's (attention_scale 1): q . (k / sqrt(head_dim)), times the 0/1 mask, - 65504 where
  masked, softmax, times v;
- positions are read where paddlenlp's prepare_inputs_for_generation reads them: the column of position_ids at
  the current length - 1 (GLMFamily.generation_inputs lays them out for every new token in advance); each step's
  mask row is the prompt's last row extended by ones, as generate()'s 4-D mask update gives it
  (chatglm_decode.BlankInfillingMasks).

paddlenlp's own update_memories slices the batch axis (hidden[-length:]), which GLMFamily.generation_inputs
avoids by padding prompts to at least the batch size; the runner has no such limit, so it gives the same
logits wherever the model runs. The in-place static export (format 3) runs the same layers (static_step: RunnerStep; the program's additive mask
turned into GLM's 0/1 mask and -65504); GLMRules gives its runner (formats/static.py) the prompt's 4-D mask per
prefill chunk and each step's column of the laid-out positions, as the hooks here give this runner.

Configurations it does not reproduce get a reason from `unsupported` (the decode
loop then runs the model's own forward): tensor parallel, attention_scale > 1 (paddlenlp subtracts the first
batch row's maxima from every row), no block positions, training mode, non-float32 weights, a static-graph
shell, a prefix-tuning wrapper (not a GLMForConditionalGeneration).
"""
from __future__ import annotations

import math
from typing import Optional

from .chatglm_decode import BlankInfillingMasks, BlankInfillingRules
from .decode_core import DecodeCore, common_unsupported, inner

MASKED = -65504.0  # what GLMAttention adds to masked scores


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this model's forward, or None when it can."""
    from paddlenlp.transformers import GLMForConditionalGeneration
    from paddlenlp.transformers.glm.modeling import GLMAttention, GLMBlock

    lm = inner(model)
    if not isinstance(lm, GLMForConditionalGeneration):
        return f"not a GLMForConditionalGeneration ({type(lm).__name__})"
    glm = lm.glm
    stack = glm.transformer
    if not getattr(stack, "layers", None):
        return "no decoder layers (a static-graph shell)"
    cfg = lm.config
    bad = common_unsupported(lm, glm.word_embeddings.weight.dtype)
    bad += [name for name, hit in {
        "attention_scale > 1": cfg.attention_scale > 1.0,
        "block_position_encoding False": not cfg.block_position_encoding,
        "output_predict False": not glm.output_predict,
    }.items() if hit]
    if bad:
        return ", ".join(bad)
    if not all(type(b) is GLMBlock and type(b.attention) is GLMAttention for b in stack.layers):
        return "a decoder layer of another kind"
    return None


class GLMDecoder(BlankInfillingMasks, DecodeCore):
    """GLM runner: keys/values cached instead of hidden-state memories, learned (block) position embeddings."""

    def __init__(self, model):
        lm = inner(model)
        self.model = lm
        self.glm = lm.glm
        self.stack = lm.glm.transformer
        self.layers = list(self.stack.layers)
        attn = self.layers[0].attention
        self.kv_heads = self.heads = attn.num_attention_heads
        self.head_dim = attn.attention_head_size
        self.key_scale = math.sqrt(self.head_dim)

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    # ------------------------------------------------------------------ masks and positions
    def _keep_mask(self, inputs):
        mask = inputs.get("attention_mask")
        length = inputs["input_ids"].shape[1]
        if mask is not None and len(mask.shape) == 4 and tuple(mask.shape[2:]) != (length, length):
            # paddlenlp's GLM would read later steps' rows from such a mask, not the prompt's last row extended
            raise ValueError("the GLMDecoder decode runner takes a [batch, 1, length, length] attention mask of the prompt "
                             "(not one laid out for the new tokens)")
        return super()._keep_mask(inputs)

    def _last_positions(self, positions):
        # a step reads position_ids' column at the current length - 1: the prompt's last column is the one before
        return ("step", positions, self.prompt_mask.shape[1] - 1)

    def _advance(self, last):
        _, positions, column = last
        return ("step", positions, column + 1)

    def _at(self, positions):
        """[B, 2, L] positions of a prefill chunk or a step (the column a step reads)."""
        kind, positions, extra = positions
        if kind == "prefill":
            return positions
        if extra >= positions.shape[2]:
            raise ValueError(f"position_ids hold {positions.shape[2]} columns; GLM reads column {extra} at this step "
                             "(GLMFamily.generation_inputs lays them out for max_new_tokens)")
        return positions[:, :, extra:extra + 1]

    def _bias(self, allowed, keep):
        """GLM's multiplicative 0/1 mask and the -65504 it adds where masked."""
        mask = allowed.astype("float32")
        return mask, MASKED * (1.0 - mask)

    def _context(self, positions, length: int):
        if positions[0] == "prefill":
            return self._bias(positions[2].unsqueeze(1), None)
        return None

    def _embed(self, ids, positions):
        positions = self._at(positions)
        hidden = self.glm.word_embeddings(ids) + self.stack.position_embeddings(positions[:, 0])
        return hidden + self.stack.block_position_embeddings(positions[:, 1])

    # ------------------------------------------------------------------ layers
    def _layer(self, i, layer, hidden, ctx, bias, kv):
        import paddle
        import paddle.nn.functional as F

        attn = layer.attention
        mask, masked = ctx if ctx is not None else bias
        normed = layer.input_layernorm(hidden)
        # reshape's 0 keeps the batch/length dims (dynamic in the static step program: static_step)
        q, k, v = (t.reshape([0, 0, self.heads, self.head_dim]).transpose([0, 2, 1, 3])
                   for t in paddle.split(attn.query_key_value(normed), 3, axis=-1))
        k, v = kv(k / self.key_scale, v)
        scores = paddle.matmul(q, k, transpose_y=True) * mask + masked
        out = paddle.matmul(F.softmax(scores, axis=-1), v)
        hidden = hidden + attn.dense(out.transpose([0, 2, 1, 3]).reshape([0, 0, self.heads * self.head_dim]))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _logits(self, hidden_last):
        import paddle

        # GLMModel's F.linear(h, weight.T) as one product with the weight read transposed: the same sums without
        # copying the [vocab, hidden] embedding (paddle's .T is a dense copy while generating) at every step
        return paddle.matmul(self.stack.final_layernorm(hidden_last), self.glm.word_embeddings.weight, transpose_y=True)[:, -1, :]


class GLMRules(BlankInfillingRules):
    """GLM: each step feeds the column of position_ids at the current length - 1 (GLMFamily.generation_inputs lays
    them out for the new tokens in advance; GLMDecoder._last_positions, _advance and _at)."""

    def last(self, positions, length: int):
        return positions, length - 1

    def advance(self, state):
        positions, column = state
        column += 1
        if column >= positions.shape[2]:
            raise ValueError(f"position_ids hold {positions.shape[2]} columns; GLM reads column {column} at this step "
                             "(GLMFamily.generation_inputs lays them out for max_new_tokens)")
        return (positions, column), positions[:, :, column:column + 1]


def static_step(model):
    """The in-place static step program (format 3, families/inplace_step.RunnerStep) running this runner's layers,
    or None where the runner does not apply."""
    from .inplace_step import RunnerStep, StepHooks

    class GLMStep(StepHooks, GLMDecoder):
        positions_spec = [None, 2, None]

        def _step_inputs(self, positions, mask, slot, end):
            """The program's additive mask (0 where attended) as _bias gives it: GLM's 0/1 mask and -65504 where masked."""
            allowed = (mask == 0).astype("float32").unsqueeze(1)
            return positions, (allowed, MASKED * (1.0 - allowed))

        def _at(self, positions):
            return positions  # the program is fed the [B, 2, L] positions of its tokens

    if unsupported(model) is not None:
        return None
    return RunnerStep(GLMStep(model))
