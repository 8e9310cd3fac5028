"""LLaMA v1/v2: causal decoder, sentencepiece tokenizer, <s> opens a sequence and </s> ends each reply."""
from .base import Family


class LlamaFamily(Family):
    def fix_tokenizer(self, tokenizer) -> None:
        # LLaMA has no pad token; PaddleNLP's llm scripts pad with <unk> (id 0), never with </s>,
        # so a padded position can't be mistaken for the end of a reply.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.unk_token

    # transformers LlamaForCausalLM: paddlenlp's own converter mapping (names, Linear transposes) is right.
    def hf_config_to_paddle(self, hf):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE scaling {kind!r} (rope_parameters/rope_scaling) is not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention_bias/mlp_bias: paddlenlp's LLaMA has no biases")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r}: paddlenlp's LLaMA uses silu")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        if hf.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
        out = {k: hf[k] for k in keys if k in hf}
        out["num_key_value_heads"] = hf.get("num_key_value_heads") or heads
        out["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        out["seq_length"] = hf.get("max_position_embeddings", 2048)
        return out

    def hf_config_from_paddle(self, config):
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id")
        out = {k: getattr(config, k) for k in keys}
        out.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
        return out

    def hf_tokenizer_config(self, tokenizer):
        return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}

    def decode_runner(self, model):
        from .llama_decode import LlamaDecoder

        return LlamaDecoder.for_model(model)

    def prefix_hooks(self):
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        return llama_postprocess_past_key_value, None


FAMILY = LlamaFamily(
    name="llama",
    model_types=("llama",),
    config_class="LlamaConfig",
    model_class="LlamaForCausalLM",
    tokenizer_class="LlamaTokenizer",
    tokenizer_kind="sentencepiece",
    tokenizer_files={"vocab_file": "sentencepiece.bpe.model"},
    special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
    ),
    example_checkpoint="meta-llama/Llama-2-7b",
    name_hints=("llama",),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    pipe_model_class="LlamaForCausalLMPipe",
    hf_architecture="LlamaForCausalLM",
    hf_model_type="llama",
    # input_layernorm -> q/k/v (separate), post_attention_layernorm -> gate/up (read in parallel)
    shift_smooth_pairing={"fused_qkv": False, "parallel_ffn": True},
    cpu_patches=("llama_rms_norm", "llama_rotary", "llama_supervised_loss", "llama_last_logits",
                 "llama_segment_attention"),
    notes="Pads with <unk> (LLaMA has no pad token). Every reply ends with </s> and is supervised.",
)
