"""OPT: causal decoder with learned positions derived from the attention mask; GPT-2 byte-level BPE tokenizer."""
import contextlib
import copy
import types

from .base import Family, with_supervised_token_mean_loss


def accept_packed_masks(model):
    """Let paddlenlp's OPTModel take packed rows (intokens): a 4-D bool mask [batch, 1, seq, keys].

    OPTModel accepts only a 2-D padding mask: its learned positions are cumsum(mask) - 1 and its causal
    mask is built from the sequence length, so packed examples would see each other and count positions
    across example boundaries. With a causal block-diagonal mask, the number of keys a token may attend
    to is exactly its position within its example plus one (plus num_prefix_tokens under prefix tuning,
    as cumsum gives for unpacked rows), so both come from the 4-D mask itself. Two instance methods are
    extended for 4-D masks; 2-D masks (every unpacked batch, and generation) take paddlenlp's own code.
    """
    import paddle
    import paddle.nn as nn

    inner = model.opt
    positions = inner.embeddings.position_embeddings
    own_positions, own_mask = positions.forward, inner._prepare_decoder_attention_mask

    def position_forward(self, attention_mask, past_key_values_length=0):
        if attention_mask.ndim == 4:
            pos = attention_mask[:, 0].astype("int64").sum(axis=-1) - 1  # [batch, seq]
            return nn.Embedding.forward(self, pos + self.offset)
        return own_positions(attention_mask, past_key_values_length)

    def prepare_mask(self, attention_mask, input_shape, past_key_values_length):
        if attention_mask.ndim == 4:  # already causal and block-diagonal: True = may attend -> additive mask
            dtype = paddle.get_default_dtype()
            return (1.0 - attention_mask.astype(dtype)) * float(paddle.finfo(dtype).min)
        return own_mask(attention_mask, input_shape, past_key_values_length)

    positions.forward = types.MethodType(position_forward, positions)
    inner._prepare_decoder_attention_mask = types.MethodType(prepare_mask, inner)
    return model


def head_of_embedding_width():
    """paddlenlp bug workaround (OPT head width), applied once when the OPT model class is resolved: OPTLMHead
    makes its own weight [vocab_size, hidden_size], but when word_embed_proj_dim != hidden_size (OPT-350m's
    shape: project_in/project_out around the layers) the decoder's project_out hands it word_embed_proj_dim-wide
    states, so such a model fails in its first forward ("the [2] dimension of Input(X) ... 64 ... 512") and its
    checkpoints (transformers' lm_head is [vocab_size, word_embed_proj_dim]) can't be loaded. The head is built
    here as if hidden_size were word_embed_proj_dim; for every other config (and a head given its embeddings)
    paddlenlp's own __init__ runs unchanged."""
    from paddlenlp.transformers.opt import modeling

    own = modeling.OPTLMHead.__init__
    if getattr(own, "_paddlellm_embedding_width", False):
        return

    def init(self, config, embedding_weights=None):
        width = getattr(config, "word_embed_proj_dim", None)
        if embedding_weights is not None or not width or width == config.hidden_size:
            return own(self, config, embedding_weights)
        narrow = copy.copy(config)
        narrow.hidden_size = width
        own(self, narrow, embedding_weights)
        self.config = config

    init._paddlellm_embedding_width = True
    modeling.OPTLMHead.__init__ = init


def _traceable_decoder_mask(neg: float):
    """OPTModel._prepare_decoder_attention_mask for a 2-D padding mask, in a form dy2static can trace: paddlenlp's
    builds the causal part only when more than one token comes (`combined = None; if len > 1: ...`, a variable
    defined in one branch) and calls float() on a constant, which dy2static turns into a cast of nothing.
    Here the causal part is always built (for one new token it allows every key, i.e. adds only zeros), so the
    values are those of paddlenlp's code: 0 where a query may attend, finfo.min (or twice that) where not."""
    import paddle

    def prepare(self, attention_mask, input_shape, past_key_values_length):
        dtype = paddle.get_default_dtype()
        keys = paddle.shape(attention_mask)[-1]
        queries = paddle.arange(input_shape[-1], dtype="int64").unsqueeze(-1) + (keys - input_shape[-1])
        causal = (1.0 - (paddle.arange(keys, dtype="int64").unsqueeze(0) <= queries).astype(dtype)) * neg
        padding = (1.0 - attention_mask.astype(dtype))[:, None, None, :] * neg
        return causal + padding

    return prepare


def _traceable_decoder_forward(layer, tgt, memory, tgt_mask=None, memory_mask=None, use_cache=False, cache=None,
                               output_attentions=False, output_hidden_states=False, return_dict=False):
    """paddlenlp's TransformerDecoder.forward for generation (no attentions or hidden states returned), without
    `self.checkpoints.append(output.name)`: recompute bookkeeping for training that fails on a traced value."""
    from paddlenlp.transformers.model_outputs import BaseModelOutputWithPastAndCrossAttentions

    output, new_caches = tgt, []
    for i, mod in enumerate(layer.layers):
        outputs = mod(output, memory, tgt_mask=tgt_mask, use_cache=use_cache, cache=cache[i] if cache is not None else cache,
                      output_attentions=False)
        output = outputs[0] if use_cache else outputs
        if use_cache:
            new_caches.append(outputs[-1])
    if layer.final_layer_norm:
        output = layer.final_layer_norm(output)
    if layer.project_out:
        output = layer.project_out(output)
    if return_dict:
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=output, past_key_values=new_caches if use_cache else None)
    return (output, new_caches) if use_cache else output


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
    def paddlenlp_class(self, attr: str):
        if attr == "model_class":  # every model built through the registry gets the head of the right width
            head_of_embedding_width()
        return super().paddlenlp_class(attr)

    def tiny_model_config(self, tokenizer, **overrides):
        # The word embeddings keep the layers' width (OPT-125m's layout) unless word_embed_proj_dim is asked for
        # (OPT-350m's project_in/project_out layout).
        if overrides.get("hidden_size") and not overrides.get("word_embed_proj_dim"):
            overrides = dict(overrides, word_embed_proj_dim=overrides["hidden_size"])
        return super().tiny_model_config(tokenizer, **overrides)

    def fix_tokenizer(self, tokenizer) -> None:
        # OPT has a real <pad> (id 1 in facebook/opt-*); fall back to eos only for vocabularies without it.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = "<pad>" if "<pad>" in tokenizer.get_vocab() else tokenizer.eos_token

    def adapt_model(self, model):
        return accept_packed_masks(with_supervised_token_mean_loss(model))

    def static_export_model(self, path: str, dtype: str = "float32"):
        # The plain paddlenlp model: dy2static can't convert the instance methods load_model patches in (the
        # trace fails in check_fn_need_transform), and they only matter for training's packed 4-D masks.
        return self.load_model(path, dtype=dtype, adapt=False)

    def static_shell_overrides(self, config):
        overrides = super().static_shell_overrides(config)
        return dict(overrides, word_embed_proj_dim=overrides["hidden_size"])  # OPT's embeddings have their own width

    @contextlib.contextmanager
    def static_export_patch(self):
        """Workaround (paddle 3.3 dy2static + paddlenlp 3.0.0b4): OPTForCausalLM.__getattr__ answers unknown names
        from its config with None, so dy2static's probes of the layer (its transform options, __code__) find None
        and fail ("'NoneType' object has no attribute 'need_transform'"). While tracing, dunder names raise."""
        import paddle
        from paddlenlp.transformers import OPTForCausalLM, OPTModel
        from paddlenlp.transformers.opt import modeling

        own = OPTForCausalLM.__getattr__

        def getattr_(layer, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return own(layer, name)

        OPTForCausalLM.__getattr__ = getattr_
        own_mask, own_decoder = OPTModel._prepare_decoder_attention_mask, modeling.TransformerDecoder.forward
        OPTModel._prepare_decoder_attention_mask = _traceable_decoder_mask(float(paddle.finfo(paddle.get_default_dtype()).min))
        modeling.TransformerDecoder.forward = _traceable_decoder_forward
        try:
            yield
        finally:
            OPTForCausalLM.__getattr__ = own
            OPTModel._prepare_decoder_attention_mask = own_mask
            modeling.TransformerDecoder.forward = own_decoder

    def bos_ids(self, tokenizer):
        # OPT was pretrained with </s> opening every document (its tokenizer has add_bos_token=True); its
        # bos and eos are the same token, and eos is the one GPTTokenizer always knows (bos may fall back
        # to GPT-2's <|endoftext|> when a tokenizer_config.json does not name it).
        return [tokenizer.eos_token_id]

    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple):
        """A 2-D padding mask for unpacked rows; packed rows get a 4-D bool mask (True = may attend), from
        which accept_packed_masks derives the positions too (OPT takes no position_ids)."""
        if simple:
            return {"input_ids": input_ids, "labels": labels, "attention_mask": pad_mask}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": self.pad_rows_attend_self(attend, pad_mask)[:, None, :, :]}

    def generation_inputs(self, tokenizer, prompts, max_new_tokens=None):
        # Positions come from the mask, so left padding is handled without position_ids (OPT warns on them).
        out = super().generation_inputs(tokenizer, prompts, max_new_tokens)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    # transformers OPTForCausalLM: paddlenlp's converter mapping is right for the layers it covers, but it leaves
    # out project_in/project_out (the layers of word_embed_proj_dim != hidden_size, e.g. OPT-350m) and paddlenlp's
    # separate LM head weight, so a converted model would predict with a random head.
    def hf_name_mappings(self, config):
        head = [("model.decoder.embed_tokens.weight", "lm_head.decoder_weight", "tied", None),  # tied checkpoints
                ("lm_head.weight", "lm_head.decoder_weight", None, None)]  # untied ones
        projections = []
        if config.word_embed_proj_dim != config.hidden_size:  # torch Linear [out, in] <-> paddle [in, out]
            projections = [("model.decoder.project_in.weight", "opt.embeddings.project_in.weight", "transpose", None),
                           ("model.decoder.project_out.weight", "opt.decoder.project_out.weight", "transpose", None)]
        return super().hf_name_mappings(config) + projections + head

    def hf_config_to_paddle(self, hf):
        hidden = hf["hidden_size"]
        if not hf.get("do_layer_norm_before", True) or hf.get("_remove_final_layer_norm"):
            raise ValueError("do_layer_norm_before=false / _remove_final_layer_norm (OPT-350m's post-LayerNorm layout) is not supported")
        if hf.get("layer_norm_elementwise_affine") is False or hf.get("enable_bias") is False:
            raise ValueError("layer_norm_elementwise_affine=false / enable_bias=false is not supported")
        return dict(
            vocab_size=hf["vocab_size"], hidden_size=hidden, word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"], intermediate_size=hf["ffn_dim"],
            hidden_act=hf.get("activation_function", "relu"), max_position_embeddings=hf["max_position_embeddings"],
            normalize_before=True, hidden_dropout_prob=hf.get("dropout", 0.1), attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        )

    def hf_config_from_paddle(self, config):
        return dict(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, word_embed_proj_dim=config.word_embed_proj_dim,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            ffn_dim=config.intermediate_size, activation_function=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings, do_layer_norm_before=True, enable_bias=True,
            layer_norm_elementwise_affine=True, dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        )

    def hf_tokenizer_config(self, tokenizer):
        # OPT opens every sequence with </s>: transformers' GPT2Tokenizer does so with add_bos_token.
        return {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False}

    def decode_runner(self, model):
        from .opt_decode import OPTDecoder

        return OPTDecoder.for_model(model)

    def static_step(self, model):
        from .opt_decode import static_step

        return static_step(model)

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
    cpu_patches=("opt_supervised_loss", "opt_last_logits", "opt_segment_attention", "linear_bias_grad"),
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
    hf_architecture="OPTForCausalLM",
    hf_model_type="opt",
    hf_tied_head=("lm_head.weight", "model.decoder.embed_tokens.weight"),
    name_hints=("facebook/opt", "opt-"),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    notes=(
        "Sequences open with </s> (OPT's bos); every reply ends with </s> and is supervised. Pads with <pad>. "
        "OPT's positions come from its attention mask: packed rows (intokens) pass a 4-D block-diagonal mask "
        "and positions are derived from it (accept_packed_masks). With prefix tuning, positions start at "
        "num_prefix_tokens."
    ),
)
