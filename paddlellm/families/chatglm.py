"""ChatGLM-6B v1: a GLM-style prefix LM: prompt [gMASK] <sop> reply <eop>, 2-D rotary positions.

Multi-turn prompts follow ChatGLM's own chat(): a single turn is the bare query; with history,
"[Round i]\\n问：{query}\\n答：{reply}\\n" per earlier turn, then "[Round n]\\n问：{query}\\n答：".
"""
from __future__ import annotations

import contextlib
import os
from typing import ClassVar, Dict, List

from .base import with_supervised_token_mean_loss
from .glm import BlankInfillingFamily, pad_attention_mask_ones


class ChatGLMFamily(BlankInfillingFamily):
    MASK_TO_SOP: ClassVar[int] = 1

    def bos_ids(self, tokenizer) -> List[int]:
        # The tokenizer's bos_token is <sop>, which comes after [gMASK]: nothing opens a sequence.
        return []

    def prompt_end_ids(self, tokenizer) -> List[int]:
        # == ChatGLMTokenizer.build_inputs_with_special_tokens
        return [tokenizer.gmask_token_id, tokenizer.bos_token_id]

    def reply_end_ids(self, tokenizer) -> List[int]:
        return [tokenizer.eos_token_id]  # <eop>

    @staticmethod
    def dialogue_text(src, history) -> str:
        if len(src) == 1:
            return src[0]
        text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(zip(src, history)))
        return text + f"[Round {len(src) - 1}]\n问：{src[-1]}\n答："

    def dialogue_ids(self, tokenizer, src, history) -> List[int]:
        # One string, tokenized at once, exactly as ChatGLM's chat() builds its prompt.
        return self.encode_text(tokenizer, self.dialogue_text(src, history))

    def adapt_model(self, model):
        return with_supervised_token_mean_loss(model)

    def static_export_model(self, path: str, dtype: str = "float32"):
        # The plain paddlenlp model: the loss fix load_model adds is for training and is an instance forward.
        return self.load_model(path, dtype=dtype, adapt=False)

    @contextlib.contextmanager
    def static_export_patch(self):
        """RotaryEmbeddings.forward in a form dy2static can trace: paddlenlp's grows a cos/sin table in Python
        (`if self.max_seq_len_cached < 0 or seq_len > self.max_seq_len_cached`) and slices it. Here the table
        is built for the positions asked every time: entry (i, j) is cos/sin of the same float32 product
        t_i * inv_freq_j whatever the table's length, so the values are the same."""
        import paddle
        from paddlenlp.transformers.chatglm import modeling

        own = modeling.RotaryEmbeddings.forward

        def forward(layer, position_ids):
            seq_len = position_ids.max() + 1
            t = paddle.arange(start=0, end=seq_len, dtype="float32")
            freqs = paddle.einsum("i,j->ij", t, layer.inv_freq)
            emb = paddle.concat([freqs, freqs], axis=-1)
            cos = emb.cos().unsqueeze(1).cast(layer.default_dtype)
            sin = emb.sin().unsqueeze(1).cast(layer.default_dtype)
            if layer.position_encoding_2d:
                block = layer.get_rotary_embeds(cos, sin, position_ids[:, 1, :].transpose([1, 0]))
                position = layer.get_rotary_embeds(cos, sin, position_ids[:, 0, :].transpose([1, 0]))
                return paddle.stack([position, block], axis=0)
            return layer.get_rotary_embeds(cos, sin, position_ids.transpose([1, 0]))

        modeling.RotaryEmbeddings.forward = forward
        try:
            yield
        finally:
            modeling.RotaryEmbeddings.forward = own

    def tiny_token_ids(self, tokenizer) -> Dict:
        # The model itself locates [MASK]/[gMASK]/<sop> by these config ids (prepare_inputs_for_generation).
        return dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            mask_token_id=tokenizer.mask_token_id,
            gmask_token_id=tokenizer.gmask_token_id,
        )

    def train_tokenizer(self, out_dir: str, vocab_size: int, lines: List[str]):
        """Tiny ice_text.model with ChatGLM's text pieces, and no image-token offset.

        ChatGLMTokenizer writes "\\n" as <n>, tabs as <|tab|> and runs of spaces as <|blank_k|> before
        sentencepiece sees the text, and its add_dummy_prefix=False path assumes "<n>" is one piece.
        num_image_tokens=0: ids are plain sentencepiece ids, as in paddlenlp's hosted chatglm-6b
        tokenizer (its tests expect "▁lower" -> 680, <unk> -> 0); paddlenlp's decode also mishandles
        a non-zero offset (it subtracts it twice).
        """
        from ..tokenizer_training import train_sentencepiece
        from paddlenlp.transformers import ChatGLMTokenizer

        pieces = list(self.special_tokens.values()) + ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
        path = os.path.join(out_dir, self.tokenizer_files["vocab_file"])
        train_sentencepiece(path, vocab_size, pieces, lines)
        ChatGLMTokenizer(vocab_file=path, num_image_tokens=0, **self.special_tokens).save_pretrained(out_dir)
        return self.load_tokenizer(out_dir)

    def decode_runner(self, model):
        from .chatglm_decode import ChatGLMDecoder

        return ChatGLMDecoder.for_model(model)

    def static_step(self, model):
        from .chatglm_decode import static_step

        return static_step(model)

    def static_rules(self):
        from .chatglm_decode import ChatGLMRules

        return ChatGLMRules()

    def prefix_hooks(self):
        from paddlenlp.peft.prefix import chatglm_postprocess_past_key_value

        # paddlenlp 3.0's ChatGLM reads True as "may attend" (paddle.where(mask, 0, -inf)); the 2023
        # llm/utils chatglm_pad_attention_mask prepended zeros (the old True = masked convention) and
        # would hide the prefix, so the virtual tokens get "may attend" columns here.
        return chatglm_postprocess_past_key_value, pad_attention_mask_ones


FAMILY = ChatGLMFamily(
    name="chatglm",
    model_types=("chatglm",),
    config_class="ChatGLMConfig",
    model_class="ChatGLMForCausalLM",
    cpu_patches=("chatglm_generation_inputs", "chatglm_supervised_loss", "chatglm_last_logits", "chatglm_segment_attention", "linear_bias_grad"),
    tokenizer_class="ChatGLMTokenizer",
    tokenizer_kind="sentencepiece",
    tokenizer_files={"vocab_file": "ice_text.model"},
    # Ordered as in ice_text.model: [MASK] [gMASK] before <sop> <eop>.
    special_tokens={
        "unk_token": "<unk>",
        "end_token": "</s>",
        "pad_token": "<pad>",
        "mask_token": "[MASK]",
        "gmask_token": "[gMASK]",
        "bos_token": "<sop>",
        "eos_token": "<eop>",
    },
    tiny_config=dict(
        hidden_size=64,
        inner_hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_sequence_length=1024,
        layernorm_epsilon=1e-5,
        position_encoding_2d=True,
    ),
    example_checkpoint="THUDM/chatglm-6b",
    hf_refusal="transformers has no ChatGLM-6B architecture (THUDM's checkpoints run only as trust_remote_code models) and paddlellm has no tested mapping of their weights; use a PaddleNLP-format checkpoint (e.g. THUDM/chatglm-6b by name)",
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
        "Prompt [gMASK] <sop> reply <eop>: the prompt attends bidirectionally, only the final reply is "
        "supervised; multi-turn prompts use ChatGLM's '[Round i]\\n问：...\\n答：...' format. paddlenlp 3.0's "
        "ChatGLM takes a 4-D bool mask with True = may attend (not HF's True = masked) and [batch, 2, seq] "
        "positions (position, block position). Left-padded batched generation equals one-by-one generation. "
        "Pretraining: objective gmask (default) cuts each sample at a random point into a bidirectional context closed by "
        "[gMASK] and one causal span, the layout the model generates with; objective causal is a plain causal LM with an "
        "explicit lower-triangular 4-D mask and [batch, 2, seq] positions (never the model's default mask)."
    ),
)
