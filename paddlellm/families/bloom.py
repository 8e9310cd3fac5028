"""BLOOM / BLOOMZ: causal decoder with ALiBi attention biases, byte-level BPE tokenizer, no bos token."""
import contextlib
import types

from .base import Family


def alibi_from_mask_positions(model):
    """Give paddlenlp's BloomModel ALiBi biases from each key's position in its own sequence when it gets a 4-D
    mask (packed rows, DPO's shared-context pairs), instead of from the key's index in the row.

    BloomModel adds slope * (key index) to every score (for a 4-D mask it builds ALiBi from an all-ones row).
    Softmax ignores a shift that is constant along a query row, so that is exact as long as each query's keys
    sit at their own positions plus one common offset: true for packed examples, false for DPO's layout, where
    the rejected reply attends to the context and to itself but starts after the chosen reply (its positions
    restart). With a causal mask whose blocks are whole sequences, the keys token j may attend to are exactly
    its sequence's tokens up to itself, so its position is that count minus one (as OPT's positions in
    opt.accept_packed_masks). The additive mask that _prepare_attn_mask returns, which the attention adds to
    the ALiBi scores, gets slope * (position - index) on every allowed key: scores then carry slope * position,
    exactly what a separate forward of that sequence gives. Masks where no query needs it (packed examples, padding)
    keep paddlenlp's own preparation. 2-D masks (unpacked batches, generation) and
    4-D masks after a cache take paddlenlp's own code (looked up on the class at call time, so
    static_export_patch's replacement still applies)."""
    import numpy as np
    import paddle
    from paddlenlp.transformers.bloom.modeling import build_alibi_tensor

    inner = model.bloom
    config = inner.config
    # paddlenlp's slopes, one per head: the bias of position 1 in a two-token row (made in numpy: a sliced
    # paddle tensor is a strided view, which later kernels refuse with FLAGS_use_stride_kernel off)
    slopes = build_alibi_tensor(paddle.ones([1, 2], dtype="bool"), config.n_head, paddle.float32).numpy()[0, :, 1]
    if config.tensor_parallel_degree > 1:  # this rank's heads, as BloomModel slices its ALiBi
        block = config.n_head // config.tensor_parallel_degree
        slopes = slopes[config.tensor_parallel_rank * block: (config.tensor_parallel_rank + 1) * block]
    slopes = paddle.to_tensor(np.ascontiguousarray(slopes, dtype="float32"))

    def prepare_mask(self, attention_mask, input_shape, past_key_values_length, num_heads):
        own = type(self)._prepare_attn_mask
        if attention_mask.ndim != 4 or past_key_values_length or attention_mask.shape[-1] != attention_mask.shape[-2]:
            return own(self, attention_mask, input_shape, past_key_values_length, num_heads)
        batch, seq = attention_mask.shape[0], attention_mask.shape[-1]
        allowed = attention_mask.astype("float32").reshape([batch, seq, seq])  # 1 = may attend
        position = allowed.sum(axis=-1) - 1  # [batch, keys]: each key's own row
        allowed = allowed.astype("bool")
        shift = position - paddle.arange(seq, dtype="float32")[None, :]
        bias = slopes[None, :, None, None] * shift[:, None, None, :]  # [batch, heads, 1, keys]
        allowed = paddle.logical_and(allowed, paddle.tril(paddle.ones([seq, seq], dtype="bool")))
        # packed examples and padding: every query's keys share its own shift, so paddlenlp's index-based ALiBi is
        # already exact, and its plain 0/min mask keeps cpu_kernels' per-block attention (bloom_segment_attention)
        if not bool(paddle.logical_and(allowed, (shift[:, None, :] - shift[:, :, None]) != 0).any()):
            return own(self, attention_mask, input_shape, past_key_values_length, num_heads)
        allowed = allowed[:, None]
        neg = paddle.full([], paddle.finfo(paddle.float32).min, dtype=paddle.float32)
        mask = paddle.where(allowed.expand([batch, num_heads, seq, seq]), bias.expand([batch, num_heads, seq, seq]), neg)
        return mask.reshape([batch * num_heads, seq, seq])

    inner._prepare_attn_mask = types.MethodType(prepare_mask, inner)
    return model


class BloomFamily(Family):
    def adapt_model(self, model):
        return alibi_from_mask_positions(model)

    def static_export_model(self, path: str, dtype: str = "float32"):
        # The plain paddlenlp model: the instance method adapt_model sets would hide static_export_patch's class-level
        # _prepare_attn_mask from the trace, and it only matters for training's 4-D masks.
        return self.load_model(path, dtype=dtype, adapt=False)

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

    def static_step(self, model):
        from .bloom_decode import static_step

        return static_step(model)

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
    cpu_patches=("bloom_supervised_loss", "bloom_last_logits", "bloom_segment_attention", "linear_bias_grad"),
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
    # dpo: paddlenlp's DPO layout (context once, then the chosen and the rejected reply in one row) is exact through
    # alibi_from_mask_positions (ALiBi from each key's own position, not its index in the row).
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True, intokens_prefix=False),
    # input_layernorm -> fused query_key_value, post_attention_layernorm -> dense_h_to_4h
    shift_smooth_pairing={"fused_qkv": True, "parallel_ffn": False},
    notes=(
        "No bos token: prompt and reply are concatenated as PaddleNLP's llm did; every reply ends with </s> and "
        "is supervised. Pads with <pad>. ALiBi positions need no position_ids, also when packing. Prefix tuning "
        "does not pack (intokens): ALiBi would place the prefix farther from every packed example after the first. "
        "DPO (run_dpo.py) puts the rejected reply after the chosen one in a row; with a 4-D mask the model takes each "
        "key's ALiBi bias from its position in its own sequence (read from the mask), so each reply is scored as alone."
    ),
)
