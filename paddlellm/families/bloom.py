"""BLOOM / BLOOMZ: causal decoder with ALiBi attention biases, byte-level BPE tokenizer, no bos token."""
import contextlib

from .base import Family


class BloomFamily(Family):
    def init_new_weights(self, model) -> None:
        """Redraw the Linear weights of a model built from a config rather than loaded (tiny models).

        Workaround for paddlenlp 3.0.0b4: BloomPreTrainedModel._init_weights sets the *weight* of every
        Linear that has a bias to zeros (it meant the bias), so a fresh BLOOM's attention and MLP output
        only their biases and every token is predicted from itself alone.
        """
        import paddle

        std = model.config.initializer_range
        for layer in model.sublayers():
            if isinstance(layer, paddle.nn.Linear):
                layer.weight.set_value(paddle.normal(0.0, std, layer.weight.shape).astype(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.set_value(paddle.zeros_like(layer.bias))

    @contextlib.contextmanager
    def static_export_patch(self):
        """BloomModel._prepare_attn_mask for the 2-D padding masks of generation, in a form dy2static can trace:
        paddlenlp's builds the causal mask only when more than one token comes (`combined = None; if len > 1:`,
        a variable set in one branch, which fails the trace). Here it is always built: for one new token it
        allows every key, so the result is the same mask."""
        import paddle
        from paddlenlp.transformers.bloom import modeling

        own = modeling.BloomModel._prepare_attn_mask

        def prepare(layer, attention_mask, input_shape, past_key_values_length, num_heads):
            causal = modeling._make_causal_mask(input_shape, past_key_values_length=past_key_values_length)
            mask = modeling._expand_2d_mask(attention_mask, tgt_length=input_shape[1]).astype("bool") & causal
            shape = mask.shape
            mask = mask.expand([shape[0], num_heads, shape[2], shape[3]])
            zero = paddle.zeros(mask.shape, dtype=paddle.float32)
            neg_inf = paddle.full(mask.shape, paddle.finfo(paddle.float32).min, dtype=paddle.float32)
            mask = paddle.where(mask, zero, neg_inf)
            batch_size, heads, queries, keys = mask.shape
            return mask.reshape([batch_size * heads, queries, keys])

        modeling.BloomModel._prepare_attn_mask = prepare
        try:
            yield
        finally:
            modeling.BloomModel._prepare_attn_mask = own

    def static_shell_overrides(self, config):
        return {"n_layer": 0, "hidden_size": 2 * config.n_head}  # BloomConfig's own names

    def bos_ids(self, tokenizer):
        # BloomTokenizer adds no bos (add_bos_token=False); PaddleNLP's llm fed the plain prompt.
        return []

    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple):
        """BLOOM takes no position ids: ALiBi adds slope * key_position to each score, and softmax ignores
        a shift that is constant along a query row, so only relative positions count. A packed example
        therefore needs no position restart, only the 4-D bool mask (True = may attend), which BloomModel
        ANDs with its causal mask. A 2-D mask feeds ALiBi through cumsum(mask), so padding is skipped too.
        """
        if simple:
            mask = pad_mask
        else:
            mask = self.pad_rows_attend_self(attend, pad_mask)[:, None, :, :]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def generation_inputs(self, tokenizer, prompts, max_new_tokens=None):
        # prepare_inputs_for_generation passes only input_ids / attention_mask / cache on.
        out = super().generation_inputs(tokenizer, prompts, max_new_tokens)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    # transformers BloomForCausalLM: the same fused query_key_value layout ([heads, 3, head_dim] on the output
    # axis); paddlenlp's converter mapping (names and Linear transposes) is right.
    _HF_KEYS = ("vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "hidden_dropout", "attention_dropout",
                "apply_residual_connection_post_layernorm", "bos_token_id", "eos_token_id", "pad_token_id")

    def hf_config_to_paddle(self, hf):
        if hf.get("slow_but_exact") and int(hf.get("pretraining_tp", 1)) > 1:
            raise ValueError("slow_but_exact with pretraining_tp > 1 is not supported")
        if hf.get("tie_word_embeddings") is False:
            raise ValueError("tie_word_embeddings=false: paddlenlp's BLOOM ties its LM head to the embeddings")
        out = {k: hf[k] for k in self._HF_KEYS if k in hf}
        out.setdefault("hidden_size", hf.get("n_embed"))
        return out

    def hf_config_from_paddle(self, config):
        out = {k: getattr(config, k) for k in self._HF_KEYS}
        out.update(tie_word_embeddings=True, slow_but_exact=False, pretraining_tp=1)
        return out

    def hf_tokenizer_config(self, tokenizer):
        return {"tokenizer_class": "BloomTokenizerFast", "add_prefix_space": False}

    def decode_runner(self, model):
        from .bloom_decode import BloomDecoder

        return BloomDecoder.for_model(model)

    def prefix_hooks(self):
        # BloomAttention concatenates its cache on axis 1: [batch, prefix_len, heads, head_dim] per layer,
        # the layout bloom_postprocess_past_key_value returns. BloomForCausalLM takes it as `cache`, and
        # the default prefix mask padding (ones before the mask's last axis) is right for its bool masks.
        from paddlenlp.peft.prefix import bloom_postprocess_past_key_value

        return bloom_postprocess_past_key_value, None

    def prefix_config_kwargs(self, config):
        return dict(num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, hidden_size=config.hidden_size)


FAMILY = BloomFamily(
    name="bloom",
    config_keys={"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"},  # BloomConfig's own names
    model_types=("bloom",),
    config_class="BloomConfig",
    model_class="BloomForCausalLM",
    cpu_patches=("bloom_supervised_loss", "bloom_last_logits", "bloom_segment_attention"),
    tokenizer_class="BloomTokenizer",
    tokenizer_kind="bpe",
    tokenizer_files={"vocab_file": "vocab.json", "merges_file": "merges.txt"},
    # In this order they get ids 0..3, as in the real BLOOM vocabulary.
    special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    tiny_config=dict(
        hidden_size=64,
        n_layer=2,
        n_head=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=True,
        # BLOOM's 0.02 at width 1024 scaled to width 64 (std * sqrt(fan_in) kept): with 0.02 here the
        # layers are near no-ops next to the layer-normed embeddings and prefix tuning barely learns.
        initializer_range=0.08,
    ),
    example_checkpoint="bigscience/bloomz-7b1-mt",
    hf_architecture="BloomForCausalLM",
    hf_model_type="bloom",
    name_hints=("bloom",),
    # intokens_prefix: ALiBi biases every key by its absolute position, so in a packed row the prefix keys sit
    # farther from the second and later examples than they would unpacked: prefix tuning + packing is inexact.
    # dpo: for the same reason, paddlenlp's DPO layout (context once, then the chosen and the rejected reply in one
    # row) would show the rejected reply its context farther away than it is alone: refused until ALiBi gets
    # per-key positions.
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True, intokens_prefix=False, dpo=False),
    # input_layernorm -> fused query_key_value, post_attention_layernorm -> dense_h_to_4h
    shift_smooth_pairing={"fused_qkv": True, "parallel_ffn": False},
    notes=(
        "No bos token: prompt and reply are concatenated as PaddleNLP's llm did; every reply ends with </s> and "
        "is supervised. Pads with <pad>. ALiBi positions need no position_ids, also when packing. Prefix tuning "
        "does not pack (intokens): ALiBi would place the prefix farther from every packed example after the first. "
        "DPO (run_dpo.py) is refused for the same reason: its layout puts the rejected reply after the chosen one, "
        "farther from their shared context than the reply is alone."
    ),
)
