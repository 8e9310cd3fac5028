"""GLM (glm-large-chinese style) and the blank-infilling layout it shares with ChatGLM v1.

A GLM-style model reads a context that ends with a mask token and generates the blank's content as
one span after a start-of-piece token:

    GLM:         [CLS] context [gMASK] <|endoftext|> <|startofpiece|> reply <|endofpiece|>
    ChatGLM v1:        context [gMASK] <sop> reply <eop>

Everything before the start-of-piece token attends bidirectionally; the span is causal. Positions are
2-D: row 0 is the token's position, except that the whole span sits at the mask's position; row 1 is
the block position, 0 in the context and 1, 2, ... from the start-of-piece token on.
"""
from __future__ import annotations

import os
from typing import ClassVar, Dict, List, Optional, Sequence

import numpy as np

from .base import IGNORE, Example, Family


class BlankInfillingFamily(Family):
    """Shared rules of GLM and ChatGLM v1 (prefix LM, 2-D positions, one generated span).

    Subclasses set MASK_TO_SOP (how many tokens after the mask token the start-of-piece token comes)
    and `dialogue_ids` (how the turns before the final reply become context tokens).
    """

    MASK_TO_SOP: ClassVar[int] = 1

    # ------------------------------------------------------------------ chat format
    def dialogue_ids(self, tokenizer, src: Sequence[str], history: Sequence[str]) -> List[int]:
        """Token ids of the prompts src[0..] with the earlier replies `history` between them (hook)."""
        raise NotImplementedError

    def _context(self, tokenizer, src: Sequence[str], history: Sequence[str], src_length: int):
        """[bos] + dialogue + closing special tokens, fitted into src_length.

        Unlike the causal default, earlier turns are plain context text: the mask and start-of-piece
        tokens close only the final prompt (a second [gMASK] would move the span's position).
        The oldest whole turns go first; then the remaining dialogue loses its beginning.
        """
        bos = self.bos_ids(tokenizer)
        close = self.prompt_end_ids(tokenizer)
        first, truncated = 0, False
        while True:
            body = self.dialogue_ids(tokenizer, src[first:], history[first:])
            if len(bos) + len(body) + len(close) <= src_length or first == len(src) - 1:
                break
            first, truncated = first + 1, True
        budget = max(src_length - len(bos) - len(close), 0)
        if len(body) > budget:
            body, truncated = (body[len(body) - budget :] if budget else []), True
        ids = list(bos) + body + list(close)
        return ids, [False] * len(ids), truncated

    # ------------------------------------------------------------------ examples
    def make_example(self, input_ids: List[int], labels: List[int], prefix_len: int, truncated: bool) -> Example:
        """2-D positions of a blank-infilling example.

        The encoder's prefix_len counts the context including the start-of-piece token; that token
        opens the span, so the bidirectional prefix stops right before it (as the model's own
        tokenizer/get_masks do).
        """
        sop = prefix_len - 1
        mask_pos = sop - self.MASK_TO_SOP
        n = len(input_ids)
        positions = list(range(sop)) + [mask_pos] * (n - sop)
        block = [0] * sop + list(range(1, n - sop + 1))
        return Example(list(input_ids), list(labels), positions, sop, block, truncated)

    # ------------------------------------------------------------------ pretraining
    def pretrain_inputs(self, tokenizer, tokens: np.ndarray, objective: str, rngs: Sequence) -> Dict[str, np.ndarray]:
        """Pretraining inputs; always an explicit 4-D mask and [B, 2, S] positions.

        causal: a plain causal LM (labels = tokens shifted once), with a lower-triangular mask. Never
        the model's default: ChatGLM v1 refuses to run without a mask, and GLM's default lets tokens
        see the future (its 1-D mask branch is dead code).
        gmask: the models' own layout. Each row is cut at a random point (drawn from its rng): the text
        before it is a bidirectional context closed by the family's [gMASK] tokens, the text after it is
        one span generated causally, exactly as a fine-tuning example (context labels -100). The row
        keeps S + 1 ids, so the last few tokens of the sample (as many as the added special tokens) are
        left out.
        """
        B, S1 = tokens.shape
        S = S1 - 1
        if objective == "causal":
            positions = np.broadcast_to(np.arange(S, dtype="int64"), (B, S))
            attend = np.broadcast_to(np.tril(np.ones([S, S], dtype=bool)), (B, S, S))
            return self.model_inputs(tokens[:, :-1], tokens[:, 1:], positions, np.zeros([B, S], dtype="int64"),
                                     attend, np.ones([B, S], dtype="int64"), False)
        bos, close = self.bos_ids(tokenizer), self.prompt_end_ids(tokenizer)
        room = S1 - len(bos) - len(close)  # text tokens that fit in a row
        rows = []
        for text, rng in zip(tokens.tolist(), rngs):
            cut = int(rng.integers(1, room - 1))  # >= 1 context token, >= 2 span tokens
            context = bos + text[:cut] + close
            ids = context + text[cut:room]
            labels = [IGNORE] * (len(context) - 1) + ids[len(context):]
            rows.append([self.make_example(ids[:-1], labels, len(context), False)])
        return self.build_batch(rows, tokenizer.pad_token_id, S)

    # ------------------------------------------------------------------ batches
    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple):
        """4-D bool mask [B, 1, S, S] (True = may attend) and [B, 2, S] positions, for single and packed rows alike.

        Both models read True/1 as "may attend": ChatGLM via paddle.where(mask, 0, -inf), GLM by
        multiplying the scores with the mask.
        """
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": np.stack([positions, block_positions], axis=1),
            "attention_mask": self.pad_rows_attend_self(attend, pad_mask)[:, None, :, :],
        }

    def generation_inputs(self, tokenizer, prompts: List[List[int]], max_new_tokens: Optional[int] = None):
        """Left-padded prompts (each ending with its start-of-piece token) with a 4-D mask and 2-D positions.

        Positions restart at each prompt's first real token, so a prompt gets the same numbers alone
        or in a batch; padding is invisible to real tokens and attends only to itself.
        max_new_tokens is unused here (GLM needs it).
        """
        return self._left_padded(tokenizer, prompts, max(len(p) for p in prompts))

    def _left_padded(self, tokenizer, prompts: List[List[int]], width: int) -> Dict[str, np.ndarray]:
        B, S = len(prompts), width
        ids = np.full([B, S], tokenizer.pad_token_id, dtype="int64")
        pos = np.zeros([B, 2, S], dtype="int64")
        mask = np.zeros([B, 1, S, S], dtype="int64")
        for b, p in enumerate(prompts):
            off, n = S - len(p), len(p)
            e = self.make_example(p, [0] * n, n, False)
            ids[b, off:] = p
            pos[b, 0, off:] = e.positions
            pos[b, 1, off:] = e.block_positions
            block = np.tril(np.ones([n, n], dtype="int64"))
            block[: e.prefix_len, : e.prefix_len] = 1
            mask[b, 0, off:, off:] = block
            mask[b, 0, np.arange(off), np.arange(off)] = 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


# ---------------------------------------------------------------------- GLM


def glm_postprocess_past_key_value(past_key_values):
    """Prefix-encoder output -> GLM's cache: a list of per-layer hidden-state memories [bs, prefix, hidden].

    GLM caches the *input hidden states* of every layer (Transformer-XL style memories), not key/value
    pairs; the frozen layer turns a memory into keys and values itself. prefix_config_kwargs sizes the
    encoder so that its [bs, prefix, 2L, 1, hidden/2] output is exactly L memories of width hidden.
    GLM's update_memories expects L+1 entries (the last is the final layer's output, never attended
    to) and assigns into the list, so it must be a fresh list.
    """
    bs, prefix, two_layers, heads, half = past_key_values.shape
    layers = two_layers // 2
    memories = past_key_values.reshape([bs, prefix, layers, heads * half * 2]).transpose([2, 0, 1, 3])
    out = list(memories.unbind(0))
    out.append(out[-1].detach() * 0)  # placeholder for the final layer's output memory
    return out


def pad_attention_mask_ones(input_ids_shape, num_prefix_tokens, attention_mask):
    """Prepend `num_prefix_tokens` columns of "may attend" (1/True) to a 4-D mask [B, 1, q, k]."""
    import paddle

    B, H, Q, _ = attention_mask.shape
    ones = paddle.ones([B, H, Q, num_prefix_tokens], dtype=attention_mask.dtype)
    return paddle.concat([ones, attention_mask], axis=-1)


class GLMFamily(BlankInfillingFamily):
    """GLM: [CLS] context [gMASK] <|endoftext|> <|startofpiece|> reply <|endofpiece|>."""

    MASK_TO_SOP: ClassVar[int] = 2

    def bos_ids(self, tokenizer) -> List[int]:
        return [tokenizer.cls_token_id]

    def prompt_end_ids(self, tokenizer) -> List[int]:
        return [tokenizer.gmask_token_id, tokenizer.eos_token_id, tokenizer.sop_token_id]

    def reply_end_ids(self, tokenizer) -> List[int]:
        return [tokenizer.eop_token_id]

    def dialogue_ids(self, tokenizer, src, history) -> List[int]:
        # GLM has no chat format: earlier turns are plain context, prompt and reply in turn.
        ids: List[int] = []
        for i, query in enumerate(src):
            ids += self.encode_text(tokenizer, query)
            if i < len(history):
                ids += self.encode_text(tokenizer, history[i])
        return ids

    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple):
        out = super().model_inputs(input_ids, labels, positions, block_positions, attend, pad_mask, simple)
        # GLMForConditionalGeneration returns an unreduced per-token loss unless it gets a loss_mask.
        out["loss_mask"] = (labels != -100).astype("float32")
        return out

    def generation_inputs(self, tokenizer, prompts, max_new_tokens: Optional[int] = None):
        """As the base, but positions are laid out for max_new_tokens generated tokens in advance.

        paddlenlp's GLM reads position_ids[:, :, step] from what it was given (its generic
        update_model_kwargs would add 1 to both rows, moving the span off the mask position), so
        the span's positions (mask position, block 1..n) must be there before generation starts.
        Default: room for 1024 new tokens (glm-large-chinese's max_sequence_length).

        paddlenlp bug workaround (GLM memories sliced on the batch axis): without a cache, GLM's
        update_memories keeps hidden[-seq_len:] of the *batch* axis, so a batch wider than its prompts
        loses rows and the second step fails; left padding to at least the batch size avoids it.
        """
        out = self._left_padded(tokenizer, prompts, max(max(len(p) for p in prompts), len(prompts)))
        extra = max_new_tokens if max_new_tokens is not None else 1024
        pos = out["position_ids"]
        last = pos[:, :, -1:]  # every prompt ends with its start-of-piece token (block position 1)
        steps = np.arange(1, extra + 1, dtype="int64")
        tail = np.concatenate([np.repeat(last[:, :1], extra, axis=2), last[:, 1:] + steps[None, None, :]], axis=1)
        out["position_ids"] = np.concatenate([pos, tail], axis=2)
        return out

    def tiny_token_ids(self, tokenizer) -> Dict:
        return dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            # generation stops at the end of the span, not at <|endoftext|> (which closes the context)
            eos_token_id=tokenizer.eop_token_id,
        )

    def train_tokenizer(self, out_dir: str, vocab_size: int, lines: List[str]):
        """Tiny cog-pretrain.model: GLMChineseTokenizer looks every special token up as a sentencepiece piece."""
        from ..tokenizer_training import train_sentencepiece
        from paddlenlp.transformers import GLMChineseTokenizer

        pieces = list(self.special_tokens.values()) + GLM_EXTRA_SPECIAL
        path = os.path.join(out_dir, self.tokenizer_files["model_file"])
        train_sentencepiece(path, vocab_size, list(dict.fromkeys(pieces)), lines)
        GLMChineseTokenizer(model_file=path, **self.special_tokens).save_pretrained(out_dir)
        return self.load_tokenizer(out_dir)

    def decode_runner(self, model):
        from .glm_decode import GLMDecoder

        return GLMDecoder.for_model(model)

    def static_step(self, model):
        from .glm_decode import static_step

        return static_step(model)

    def static_rules(self):
        from .glm_decode import GLMRules

        return GLMRules()

    def prefix_hooks(self):
        return glm_postprocess_past_key_value, pad_attention_mask_ones

    def prefix_config_kwargs(self, config) -> Dict:
        # One head of width hidden/2 makes the encoder emit 2 * L * hidden/2 = L * hidden numbers per
        # virtual token: one hidden-state memory per layer (see glm_postprocess_past_key_value).
        return dict(num_hidden_layers=config.num_layers, num_attention_heads=1, hidden_size=config.hidden_size // 2)


# The extra special tokens GLMChineseTokenizer registers by default (additional_special_tokens).
GLM_EXTRA_SPECIAL = ["[UNUSED1]", "[UNUSED2]", "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"]

FAMILY = GLMFamily(
    name="glm",
    config_keys={"num_hidden_layers": "num_layers"},  # GLMConfig's own name (num_hidden_layers is reset in __init__)
    model_types=("glm",),
    config_class="GLMConfig",
    model_class="GLMForConditionalGeneration",
    cpu_patches=("glm_supervised_loss", "glm_last_logits", "glm_segment_attention", "linear_bias_grad"),
    tokenizer_class="GLMChineseTokenizer",
    tokenizer_kind="sentencepiece",
    tokenizer_files={"model_file": "cog-pretrain.model"},
    # pad_token defaults to <|endoftext|> too; listing it twice would define one sentencepiece piece twice.
    special_tokens={
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "eos_token": "<|endoftext|>",
    },
    tiny_config=dict(
        num_layers=2,  # GLMConfig's own name; num_hidden_layers is only an alias
        hidden_size=64,
        num_attention_heads=4,
        max_sequence_length=512,
        output_predict=True,
        embedding_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        output_dropout_prob=0.0,
    ),
    example_checkpoint="THUDM/glm-large-chinese",
    hf_refusal="transformers has no GLM-large/10B (blank-infilling) architecture: its own 'glm' model type is GLM-4, a different causal design; use a PaddleNLP-format checkpoint (e.g. THUDM/glm-large-chinese by name)",
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    pretrain_objectives=("gmask", "causal"),
    lora_target_modules=[
        r".*attention\.query_key_value",
        r".*attention\.dense",
        r".*mlp\.dense_h_to_4h",
        r".*mlp\.dense_4h_to_h",
    ],
    prefix_lm=True,
    notes=(
        "Blank infilling: [CLS] prompt [gMASK] <|endoftext|> <|startofpiece|> reply <|endofpiece|>; the prompt "
        "attends bidirectionally and only the final reply is supervised (earlier turns are plain context). "
        "Generation stops at <|endofpiece|>, not at the tokenizer's eos <|endoftext|>; generation_inputs lays "
        "out positions for max_new_tokens (default 1024) in advance, as paddlenlp's GLM reads them by step. "
        "2-D positions [batch, 2, seq] and a 4-D mask (1 = attend) are always passed: paddlenlp's 1-D 'sep' mask "
        "path is dead code. Prefix tuning learns per-layer hidden-state memories (GLM's cache holds hidden states, not "
        "key/values). GLMChineseTokenizer is not known to AutoTokenizer; load it through the family. "
        "Pretraining: objective gmask (default) cuts each sample at a random point into a bidirectional context closed by "
        "[gMASK] and one causal span, the layout the model generates with; objective causal is a plain causal LM with an "
        "explicit lower-triangular 4-D mask and [batch, 2, seq] positions (never the model's default mask)."
    ),
)
