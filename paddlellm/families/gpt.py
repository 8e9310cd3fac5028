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

    def load_model(self, path: str, dtype: str = "float32", **config_overrides):
        # GPTConfig.ignore_index defaults to 0: its criterion would ignore token 0 and fail on -100 labels.
        config_overrides.setdefault("ignore_index", IGNORE)
        model = super().load_model(path, dtype=dtype, **config_overrides)
        return _keep_attention_mask_in_generation(model)

    def static_shell_patch(self, shell):
        return _keep_attention_mask_in_generation(shell)

    # model_inputs / generation_inputs: the base conventions are GPT's. GPTModel casts the mask to int64
    # and ANDs it with its causal mask (2-D padding mask, or 4-D with 1 = may attend), and takes
    # [batch, seq] position_ids (needed for left-padded prompts; generate() extends them by +1 per step).

    def prefix_hooks(self):
        # GPT's cache per layer is [batch, prefix_len, heads, head_dim] (concatenated on axis 1), the
        # layout llama_postprocess_past_key_value returns; the default prefix mask padding fits GPTModel.
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        return llama_postprocess_past_key_value, None


FAMILY = GPTFamily(
    name="gpt-3",
    model_types=("gpt",),
    config_class="GPTConfig",
    model_class="GPTForCausalLM",
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
    name_hints=("gpt",),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    notes=(
        "No bos token: prompt and reply are concatenated as PaddleNLP's llm did; every reply ends with "
        "<|endoftext|> and is supervised. Pads with <|endoftext|> (GPT-2 has no pad token; the attention mask "
        "and -100 labels keep padding out). Loading sets ignore_index=-100 (GPTConfig defaults to 0) and works "
        "around paddlenlp dropping the attention mask in generate()."
    ),
)
