"""ChatGLM2-6B: causal decoder with rotary positions and multi-query attention, sentencepiece tokenizer.

Every sequence opens with [gMASK] sop (ChatGLMv2Tokenizer.build_inputs_with_special_tokens); each
turn is rendered with the "[Round i]\\n\\n问：...\\n\\n答：" template the model was fine-tuned with.
"""
from .base import Family


class ChatGLMv2Family(Family):
    # fix_tokenizer / tiny_token_ids: the base hooks fit. ChatGLMv2Tokenizer hard-wires pad = <unk> (id 0)
    # and eos = </s> as read-only properties and has no bos; its SPTokenizer appends [MASK] [gMASK]
    # [sMASK] sop eop <|system|> ... after the sentencepiece pieces, and len() counts them, so a tiny
    # vocabulary (and its embedding) has them too.

    def tiny_model_config(self, tokenizer, **overrides):
        cfg = super().tiny_model_config(tokenizer, **overrides)
        # each head's width (SelfAttention asserts kv_channels * heads == hidden_size) follows an overridden width
        cfg["kv_channels"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        return cfg

    def turn_prompt(self, index: int, query: str) -> str:
        # ChatGLMv2Tokenizer.build_prompt: rounds are numbered from 1.
        return f"[Round {index + 1}]\n\n问：{query}\n\n答："

    def bos_ids(self, tokenizer):
        return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]

    # model_inputs / generation_inputs: the base conventions are exactly ChatGLM2's. Its get_masks()
    # ANDs the given mask with a causal one, taking either a 2-D padding mask or a 4-D bool mask
    # (True = may attend), and rotary embeddings are gathered by the given [batch, seq] position_ids,
    # which generate() extends by +1 per step (without them it would use arange and ignore left padding).

    def decode_runner(self, model):
        from .chatglm_v2_decode import ChatGLMv2Decoder

        return ChatGLMv2Decoder.for_model(model)

    def static_step(self, model):
        from .chatglm_v2_decode import static_step

        return static_step(model)

    def prefix_hooks(self):
        # Cache layout per layer: [prefix_len, batch, kv_groups, head_dim] (sequence first), which is
        # what chatglm_postprocess_past_key_value produces. The default prefix mask padding (ones before
        # a 2-D mask, ones before the last axis of a 4-D bool mask) matches get_masks().
        from paddlenlp.peft.prefix import chatglm_postprocess_past_key_value

        return chatglm_postprocess_past_key_value, None

    def prefix_config_kwargs(self, config):
        # Multi-query attention: the prefix holds keys/values for the kv groups only
        # (PrefixModelForCausalLM sizes it by multi_query_group_num when given).
        kwargs = super().prefix_config_kwargs(config)
        kwargs["multi_query_group_num"] = config.multi_query_group_num
        return kwargs


FAMILY = ChatGLMv2Family(
    name="chatglm_v2",
    model_types=("chatglm_v2",),
    config_class="ChatGLMv2Config",
    model_class="ChatGLMv2ForCausalLM",
    tokenizer_class="ChatGLMv2Tokenizer",
    tokenizer_kind="sentencepiece",
    tokenizer_files={"vocab_file": "tokenizer.model"},
    # Its special tokens ([gMASK], sop, ...) are created by the tokenizer itself, not read from the model
    # file, and its pad/eos are read-only properties: nothing to pass.
    special_tokens={},
    # ChatGLMv2Config's num_layers / seq_length / padded_vocab_size are read-only aliases: its __init__
    # overwrites them with num_hidden_layers / max_sequence_length / vocab_size, so those are set here.
    tiny_config=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,  # hidden_size / num_attention_heads (asserted by SelfAttention)
        multi_query_group_num=2,
        ffn_hidden_size=128,
        max_sequence_length=1024,
        add_qkv_bias=True,
    ),
    example_checkpoint="THUDM/chatglm2-6b",
    hf_refusal="transformers has no ChatGLM2-6B architecture (THUDM's checkpoints run only as trust_remote_code models) and paddlellm has no tested mapping of their weights; use a PaddleNLP-format checkpoint (e.g. THUDM/chatglm2-6b by name)",
    name_hints=("chatglm2", "chatglm_v2"),
    # input_layernorm -> fused query_key_value, post_attention_layernorm -> dense_h_to_4h. (PaddleNLP declared
    # fused_qkv False, which leaves input_layernorm unpaired; measured here: both keep outputs, this one pairs all.)
    shift_smooth_pairing={"fused_qkv": True, "parallel_ffn": False},
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    export_patches=("chatglm_v2_rms_norm",),
    cpu_patches=("chatglm_v2_rms_norm", "chatglm_v2_supervised_loss", "chatglm_v2_segment_attention", "linear_bias_grad"),
    notes=(
        "Sequences open with [gMASK] sop; turns use the '[Round i]\\n\\n问：{q}\\n\\n答：' template. Pads with "
        "<unk> (id 0), left padding for generation with explicit position_ids. Every reply ends with </s> and "
        "is supervised (between turns the original chat template has '\\n\\n' instead). Multi-query attention: "
        "the prefix-tuning prefix holds multi_query_group_num key/value heads, and the tensor-parallel degree must "
        "divide multi_query_group_num (2 for chatglm2-6b)."
    ),
)
