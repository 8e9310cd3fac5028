"""GPT-3 / GPT-2 (paddlenlp GPTForCausalLM): causal decoder with learned positions, byte-level BPE tokenizer."""
from .base import IGNORE, Family


def _keep_attention_mask_in_generation(model):
    """Workaround for paddlenlp 3.0.0b4: GPTForCausalLM.prepare_inputs_for_generation returns
    attention_mask=None, so generate() lets left-padded prompts attend to their padding (and
    PrefixModelForCausalLM.generate crashes reading the None mask). Pass the mask on; GPTModel ANDs a
    2-D mask with its causal mask, also for the one-token cached steps."""
    if getattr(model, "_paddlellm_keeps_generation_mask", False):
        return model
    original = model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids, use_cache=False, past_key_values=None, **kwargs):
        inputs = original(input_ids, use_cache=use_cache, past_key_values=past_key_values, **kwargs)
        inputs["attention_mask"] = kwargs.get("attention_mask")
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    model._paddlellm_keeps_generation_mask = True
    return model


class GPTFamily(Family):
    def bos_ids(self, tokenizer):
        # GPTTokenizer adds no bos (add_bos_token=False); PaddleNLP's llm fed the plain prompt.
        return []

    def model_config_overrides(self):
        # GPTConfig.ignore_index defaults to 0: its criterion would ignore token 0 and fail on -100 labels.
        return {"ignore_index": IGNORE}

    def adapt_model(self, model):
        return _keep_attention_mask_in_generation(model)

    def static_shell_patch(self, shell):
        return _keep_attention_mask_in_generation(shell)

    # model_inputs / generation_inputs: the base conventions are GPT's. GPTModel casts the mask to int64
    # and ANDs it with its causal mask (2-D padding mask, or 4-D with 1 = may attend), and takes
    # [batch, seq] position_ids (needed for left-padded prompts; generate() extends them by +1 per step).

    # transformers GPT2LMHeadModel is the same design (pre-LayerNorm, learned positions, tanh-approximated GELU,
    # LM head tied to the embeddings). paddlenlp's converter mapping splits the fused c_attn (Conv1D weights are
    # already [in, out]), but maps lm_head to a name GPTForCausalLM does not have: the head is tied, so drop it.
    def hf_name_mappings(self, config):
        return [m for m in super().hf_name_mappings(config) if not m[0].startswith("lm_head.")]

    def hf_config_to_paddle(self, hf):
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r}: paddlenlp's GPT uses the tanh-approximated GELU (gelu_new)")
        if float(hf.get("layer_norm_epsilon", 1e-5)) != 1e-5:
            raise ValueError(f"layer_norm_epsilon {hf['layer_norm_epsilon']}: paddlenlp's GPT fixes it at 1e-5")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("scale_attn_weights=false / scale_attn_by_inverse_layer_idx: paddlenlp's GPT scales by 1/sqrt(head_dim)")
        if hf.get("tie_word_embeddings") is False:
            raise ValueError("tie_word_embeddings=false: paddlenlp's GPT ties its LM head to the embeddings")
        hidden = hf["n_embd"]
        return dict(
            vocab_size=hf["vocab_size"], hidden_size=hidden, num_hidden_layers=hf["n_layer"], num_attention_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hidden, max_position_embeddings=hf["n_positions"],
            seq_length=hf["n_positions"], hidden_dropout_prob=hf.get("resid_pdrop", 0.1),
            attention_probs_dropout_prob=hf.get("attn_pdrop", 0.1), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        )

    def hf_config_from_paddle(self, config):
        return dict(
            vocab_size=config.vocab_size, n_embd=config.hidden_size, n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads, n_positions=config.max_position_embeddings,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=config.hidden_dropout_prob,
            embd_pdrop=config.hidden_dropout_prob, attn_pdrop=config.attention_probs_dropout_prob,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=True,
            # transformers' own convention: None means 4 * n_embd
            n_inner=None if config.intermediate_size == 4 * config.hidden_size else config.intermediate_size,
        )

    def hf_tokenizer_config(self, tokenizer):
        return {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}

    def decode_runner(self, model):
        from .gpt_decode import GPTDecoder

        return GPTDecoder.for_model(model)

    def static_step(self, model):
        from .gpt_decode import static_step

        return static_step(model)

    def prefix_hooks(self):
        # GPT's cache per layer is [batch, prefix_len, heads, head_dim] (concatenated on axis 1), the
        # layout llama_postprocess_past_key_value returns; the default prefix mask padding fits GPTModel.
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        return llama_postprocess_past_key_value, None


FAMILY = GPTFamily(
    name="gpt-3",
    model_types=("gpt", "gpt2"),
    config_class="GPTConfig",
    model_class="GPTForCausalLM",
    cpu_patches=("gpt_supervised_loss", "gpt_last_logits", "gpt_segment_attention", "linear_bias_grad"),
    tokenizer_class="GPTTokenizer",
    tokenizer_kind="bpe",
    tokenizer_files={"vocab_file": "vocab.json", "merges_file": "merges.txt"},
    # GPT-2's one special token plays every role (naming bos also stops GPTTokenizer logging an error).
    special_tokens={
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    },
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        seq_length=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        ignore_index=IGNORE,
    ),
    example_checkpoint="gpt2-medium-en",
    hf_architecture="GPT2LMHeadModel",
    hf_model_type="gpt2",
    hf_buffers=(r"\.attn\.(masked_)?bias$",),  # causal-mask buffers transformers < 4.3x saved with GPT-2
    name_hints=("gpt",),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    # the LM head is tied to the (vocabulary-split) embeddings, but the checkpoint also holds it by this name
    tp_tied_keys={"lm_head.weight": "gpt.embeddings.word_embeddings.weight"},
    notes=(
        "No bos token: prompt and reply are concatenated as PaddleNLP's llm did; every reply ends with "
        "<|endoftext|> and is supervised. Pads with <|endoftext|> (GPT-2 has no pad token; the attention mask "
        "and -100 labels keep padding out). Loading sets ignore_index=-100 (GPTConfig defaults to 0) and works "
        "around paddlenlp dropping the attention mask in generate()."
    ),
)
