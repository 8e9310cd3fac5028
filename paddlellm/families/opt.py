"""OPT: causal decoder with learned positions derived from the attention mask; GPT-2 byte-level BPE tokenizer."""
from .base import Family, with_supervised_token_mean_loss


def opt_postprocess_past_key_value(past_key_values):
    """[batch, prefix_len, 2 * layers, heads, head_dim] -> one MultiHeadAttention.Cache(k, v) per layer.

    OPT's attention concatenates its cache on axis 2 ([batch, heads, seq, head_dim]) and uses it only when
    it is an instance of its Cache namedtuple: a plain (k, v) tuple would be silently ignored.
    """
    import paddle
    from paddlenlp.transformers.opt.modeling import MultiHeadAttention

    keys, values = paddle.transpose(past_key_values, perm=[2, 0, 3, 1, 4]).split(2)
    return [MultiHeadAttention.Cache(k, v) for k, v in zip(keys, values)]


class OPTFamily(Family):
    def fix_tokenizer(self, tokenizer) -> None:
        # OPT has a real <pad> (id 1 in facebook/opt-*); fall back to eos only for vocabularies without it.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = "<pad>" if "<pad>" in tokenizer.get_vocab() else tokenizer.eos_token

    def load_model(self, path: str, dtype: str = "float32", **config_overrides):
        return with_supervised_token_mean_loss(super().load_model(path, dtype=dtype, **config_overrides))

    def bos_ids(self, tokenizer):
        # OPT was pretrained with </s> opening every document (its tokenizer has add_bos_token=True); its
        # bos and eos are the same token, and eos is the one GPTTokenizer always knows (bos may fall back
        # to GPT-2's <|endoftext|> when a tokenizer_config.json does not name it).
        return [tokenizer.eos_token_id]

    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple):
        """OPT takes only a 2-D padding mask: positions are cumsum(mask) - 1 and the mask is expanded as
        [batch, 1, 1, seq], so there is no way to give per-example positions or a block-diagonal mask."""
        if not simple:
            raise NotImplementedError(
                "OPT cannot take packed rows (intokens): OPTModel derives positions from cumsum of a 2-D "
                "attention mask and accepts no 4-D mask, so packed examples would see each other. "
                "Train OPT with intokens off."
            )
        return {"input_ids": input_ids, "labels": labels, "attention_mask": pad_mask}

    def generation_inputs(self, tokenizer, prompts, max_new_tokens=None):
        # Positions come from the mask, so left padding is handled without position_ids (OPT warns on them).
        out = super().generation_inputs(tokenizer, prompts, max_new_tokens)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def prefix_hooks(self):
        # The default prefix mask padding (ones before the 2-D mask) is right for OPT; note that positions,
        # being cumsum(mask) - 1, then start at num_prefix_tokens (as with HF OPT + PEFT prefix tuning),
        # identically in training and generation.
        return opt_postprocess_past_key_value, None


FAMILY = OPTFamily(
    name="opt",
    model_types=("opt",),
    config_class="OPTConfig",
    model_class="OPTForCausalLM",
    tokenizer_class="GPTTokenizer",
    tokenizer_kind="bpe",
    tokenizer_files={"vocab_file": "vocab.json", "merges_file": "merges.txt"},
    special_tokens={"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"},
    tiny_config=dict(
        hidden_size=64,
        word_embed_proj_dim=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    example_checkpoint="facebook/opt-125m",
    name_hints=("facebook/opt", "opt-"),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=False),
    notes=(
        "Sequences open with </s> (OPT's bos); every reply ends with </s> and is supervised. Pads with <pad>. "
        "No packing (intokens): OPT's positions come from a 2-D attention mask. With prefix tuning, positions "
        "start at num_prefix_tokens."
    ),
)
