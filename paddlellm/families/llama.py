"""LLaMA v1/v2: causal decoder, sentencepiece tokenizer, <s> opens a sequence and </s> ends each reply."""
from .base import Family


class LlamaFamily(Family):
    def fix_tokenizer(self, tokenizer) -> None:
        # LLaMA has no pad token; PaddleNLP's llm scripts pad with <unk> (id 0), never with </s>,
        # so a padded position can't be mistaken for the end of a reply.
        # A tokenizer.json checkpoint may have no <unk> either (Llama 3): pad with the end-of-sequence token then.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token

    def bos_ids(self, tokenizer):
        # A tokenizer.json checkpoint that opens no sequence with a BOS (SmolLM2) gets none in the own format either.
        return super().bos_ids(tokenizer) if getattr(tokenizer, "add_bos_token", True) else []

    # transformers LlamaForCausalLM: paddlenlp's own converter mapping (names, Linear transposes) is right.
    def hf_config_to_paddle(self, hf):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_kwargs = self._rope_to_paddle(rope, "rope_parameters" if hf.get("rope_parameters") else "rope_scaling")
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
        out.update(rope_kwargs)
        return out

    # transformers rope types paddlenlp's LlamaAttention._init_rope reproduces: "llama3" (Llama 3.1/3.2) through
    # its rope_scaling dict, "linear" through rope_scaling_type + rope_scaling_factor.
    LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

    def _rope_to_paddle(self, rope, where: str):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            return {}
        if kind == "linear":
            return {"rope_scaling_type": "linear", "rope_scaling_factor": float(rope["factor"])}
        if kind == "llama3":
            missing = [k for k in self.LLAMA3_KEYS if k not in rope]
            if missing:
                raise ValueError(f"{where} of type 'llama3' lacks {', '.join(missing)}")
            return {"rope_scaling": {"rope_type": "llama3", **{k: rope[k] for k in self.LLAMA3_KEYS}}}
        raise ValueError(f"{where} rope_type {kind!r} is not supported (paddlellm reproduces 'default', 'linear' and 'llama3')")

    def hf_config_from_paddle(self, config):
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id")
        out = {k: getattr(config, k) for k in keys}
        out.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
        scaling = getattr(config, "rope_scaling", None)
        if isinstance(scaling, dict) and scaling.get("rope_type") == "llama3":
            out["rope_scaling"] = {"rope_type": "llama3", **{k: scaling[k] for k in self.LLAMA3_KEYS}}
        elif getattr(config, "rope_scaling_type", None) == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": float(config.rope_scaling_factor)}
        elif getattr(config, "rope_scaling_type", None) is not None:
            raise ValueError(f"rope_scaling_type {config.rope_scaling_type!r} has no transformers equivalent here")
        return out

    def hf_tokenizer_config(self, tokenizer):
        return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}

    def decode_runner(self, model):
        from .llama_decode import LlamaDecoder

        return LlamaDecoder.for_model(model)

    def static_step(self, model):
        # the in-place step program, built from the same layers as the decode runner, wherever that runner applies
        from .llama_decode import static_step

        return static_step(model)

    def prefix_hooks(self):
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        return llama_postprocess_past_key_value, None


FAMILY = LlamaFamily(
    name="llama",
    model_types=("llama",),
    config_class="LlamaConfig",
    model_class="LlamaForCausalLM",
    tokenizer_class="LlamaTokenizer",
    fast_tokenizer_class="LlamaTokenizerFast",
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
    export_patches=("llama_rms_norm",),
    cpu_patches=("llama_rms_norm", "llama_rotary", "llama_supervised_loss", "llama_last_logits",
                 "llama_segment_attention"),
    notes="Pads with <unk> (LLaMA has no pad token). Every reply ends with </s> and is supervised.",
)
