"""Qwen2 / Qwen2.5: LLaMA-like causal decoder (RMSNorm, rotary, SwiGLU, grouped-query attention) with biases on
q/k/v, a byte-level BPE tokenizer with Qwen's own split rule and no bos token, and the ChatML chat format:

    <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n<|im_start|>user\\n...

Every reply's <|im_end|> is supervised and ends generation, whatever the checkpoint's eos is (base Qwen2.5 models
say <|endoftext|>, instruct models <|im_end|>).
"""
import json
import os
from typing import List

from .base import Family

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenizer split rule (its tokenizer.json "Split" pattern, also paddlenlp's Qwen2Tokenizer regex):
# digits one by one, letters with at most one leading non-letter, runs of newlines on their own.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                 r"""|\s+(?!\S)|\s+""")


def _register_added_tokens(tokenizer, tokens: List[str]) -> None:
    """Make `tokens` (already in the vocabulary) single tokens wherever they occur in text, as transformers' tokenizer
    does with tokenizer.json's added tokens, and special (skipped by decode(skip_special_tokens=True)). paddlenlp's
    Qwen2Tokenizer splits even its own eos/pad tokens into pieces otherwise (<|endoftext|> -> '<', '|', 'end', ...).

    They are registered as special AddedToken without lstrip/rstrip: paddlenlp strips the whitespace around any other
    unsplit token, which would drop the "\n" between <|im_end|> and <|im_start|>. So an added token transformers calls
    not special (Qwen2.5's <tool_call>) keeps its id here too, but decode(skip_special_tokens=True) drops it."""
    if not tokens:
        return
    from paddlenlp.transformers import AddedToken

    def added(t):
        return AddedToken(t, lstrip=False, rstrip=False, special=True, normalized=False)

    core = {str(v) for k, v in tokenizer.special_tokens_map.items() if k != "additional_special_tokens"}
    known = [t for t in tokenizer.additional_special_tokens if t not in tokens]
    extra = [added(t) for t in tokens if t not in core]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": known + extra})
    tokenizer.add_tokens([added(t) for t in tokens], special_tokens=True)  # no new ids: they are in the vocabulary


def hf_added_tokens(path: str) -> List[str]:
    """The added tokens of a transformers folder's tokenizer.json (Qwen2.5 has 22: ChatML, fim, vision, tool call)."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        return []
    with open(tj, encoding="utf-8") as f:
        return [a["content"] for a in json.load(f).get("added_tokens", [])]


def _traceable_attention(query_states, config, key_states, value_states, attention_mask, output_attentions,
                         attn_mask_startend_row_indices=None, training=True, sequence_parallel=False, skip_recompute=False):
    """paddlenlp Qwen2's scaled_dot_product_attention (its non-flash path: same ops, same order) without its shape checks,
    which compare shapes holding dynamic dims and so stop dy2static ("bool(Tensor) is not supported"); LLaMA's checks
    run in dynamic mode only. Used for static export; q/k/v [batch, seq, heads, head_dim], mask additive [b, 1, q, k]."""
    import math

    import paddle
    import paddle.nn.functional as F

    bsz, q_len, num_heads, head_dim = query_states.shape
    kv_seq_len = value_states.shape[1]
    q = paddle.transpose(query_states, [0, 2, 1, 3])
    k = paddle.transpose(key_states, [0, 2, 1, 3])
    v = paddle.transpose(value_states, [0, 2, 1, 3])
    scores = paddle.matmul(q / math.sqrt(head_dim), k.transpose([0, 1, 3, 2]))
    scores = scores + attention_mask.reshape([bsz, 1, q_len, kv_seq_len])
    probs = F.softmax(scores, axis=-1, dtype="float32").astype(q.dtype)
    out = paddle.matmul(probs, v).transpose([0, 2, 1, 3])
    if sequence_parallel:
        out = out.reshape([bsz * q_len, head_dim * num_heads])
    else:
        out = out.reshape([bsz, q_len, head_dim * num_heads])
    return (out, probs) if output_attentions else out


def _cached_rotary_tables(self, x, seq_len=None):
    """Qwen2RotaryEmbedding.forward without the cache rebuild (see Qwen2Family.static_export_model)."""
    cos, sin = self.cos_cached[:, :seq_len, :, :], self.sin_cached[:, :seq_len, :, :]
    return (cos.cast(x.dtype) if cos.dtype != x.dtype else cos, sin.cast(x.dtype) if sin.dtype != x.dtype else sin)


class Qwen2Family(Family):
    # ------------------------------------------------------------------ tokenizer
    def load_tokenizer(self, path: str, chat_template=None):
        tok = super().load_tokenizer(path, chat_template=chat_template)
        vocab = tok.get_vocab()
        _register_added_tokens(tok, [t for t in hf_added_tokens(path) if t in vocab])
        return tok

    def fix_tokenizer(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        _register_added_tokens(tokenizer, [t for t in CHATML if t in vocab])
        if tokenizer.pad_token_id is None:  # Qwen pads with <|endoftext|>, never with the <|im_end|> replies end with
            tokenizer.pad_token = ENDOFTEXT

    def train_tokenizer(self, out_dir: str, vocab_size: int, lines: List[str]):
        """A tiny byte-level BPE built like Qwen2's (NFC, Qwen's split rule, then bytes), ChatML tokens first."""
        from paddlenlp.transformers import Qwen2Tokenizer
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(CHATML),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(lines, trainer)
        tok.model.save(out_dir)  # vocab.json + merges.txt
        files = {arg: os.path.join(out_dir, name) for arg, name in self.tokenizer_files.items()}
        tokenizer = Qwen2Tokenizer(**files, **self.special_tokens)
        self.fix_tokenizer(tokenizer)  # <|im_start|> and <|im_end|> become additional special tokens
        tokenizer.save_pretrained(out_dir)
        return self.load_tokenizer(out_dir)

    def tiny_token_ids(self, tokenizer):
        # bos: <|endoftext|>, as Qwen2's config.json says (never fed: Qwen2 opens no sequence with it)
        return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT))

    # ------------------------------------------------------------------ chat format (ChatML)
    def bos_ids(self, tokenizer):
        return []  # Qwen2 has no bos token

    def turn_prompt(self, index: int, query: str) -> str:
        # "user\n" + query is tokenized as one piece, as transformers tokenizes the rendered ChatML text; the "\n"
        # after the previous reply's <|im_end|> opens every later turn.
        return ("\n" if index else "") + f"{IM_START}user\n{query}"

    def prompt_end_ids(self, tokenizer):
        return self.encode_text(tokenizer, f"{IM_END}\n{IM_START}assistant\n")

    def reply_end_ids(self, tokenizer):
        return [tokenizer.convert_tokens_to_ids(IM_END)]

    # ------------------------------------------------------------------ models
    def init_new_weights(self, model) -> None:
        """Random q/k/v biases for a model built from a config (tiny models, pretraining from scratch): paddlenlp
        zeroes them, and then nothing would show whether a bias is loaded, converted or merged right."""
        import paddle

        std = model.config.initializer_range
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.set_value(paddle.normal(0.0, std, p.shape).astype(p.dtype))

    # transformers Qwen2ForCausalLM: paddlenlp's converter mapping (names, Linear transposes, q/k/v biases, lm_head
    # only when untied) is right.
    _HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "attention_dropout", "initializer_range", "max_window_layers")

    def hf_config_to_paddle(self, hf):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE scaling {kind!r} (rope_parameters/rope_scaling) is not supported")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: paddlenlp's Qwen2 attends over the whole sequence")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r}: paddlenlp's Qwen2 uses silu")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        if hf.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        out = {k: hf[k] for k in self._HF_KEYS if k in hf}
        for k in ("bos_token_id", "eos_token_id"):  # a list (several stop tokens): the config keeps the first
            if isinstance(out.get(k), list):
                out[k] = out[k][0]
        out["num_key_value_heads"] = hf.get("num_key_value_heads") or heads
        out["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        out["seq_length"] = hf.get("max_position_embeddings", 32768)
        out.setdefault("tie_word_embeddings", False)  # transformers' Qwen2Config default
        return out

    def hf_config_from_paddle(self, config):
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "initializer_range",
                "max_window_layers")
        out = {k: getattr(config, k) for k in keys}
        # max_window_layers is kept only to round-trip: without sliding windows it changes nothing
        out.update(hidden_act="silu", use_sliding_window=False, sliding_window=None, rope_scaling=None)
        return out

    def hf_tokenizer_config(self, tokenizer):
        return {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
                "errors": "replace", "split_special_tokens": False}

    def hf_tokenizer_json(self, out: str, tokenizer) -> None:
        """tokenizer.json with Qwen2's pipeline (NFC, Qwen's split rule, byte level; no bos added) and every special
        token of the tokenizer as an added token, from the vocab.json + merges.txt already written into `out`
        (formats/hf.py's write_tokenizer calls this instead of its GPT-2 style writer)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        tok = Tokenizer(models.BPE.from_file(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt")))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        specials = sorted(set(tokenizer.all_special_tokens), key=tokenizer.convert_tokens_to_ids)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.save(os.path.join(out, "tokenizer.json"))

    def decode_runner(self, model):
        from .qwen2_decode import Qwen2Decoder

        return Qwen2Decoder.for_model(model)

    def static_export_model(self, path: str, dtype: str = "float32"):
        """The model with two pieces dy2static can trace (export only; same values):
        - attention without paddlenlp's shape checks (see _traceable_attention);
        - rotary tables read from the cache built at load time (max_position_embeddings long): paddlenlp's rebuilds the
          cache `if seq_len > max_seq_len_cached`, which the trace turns into a branch that stores static values in the
          layer, and every later dynamic call (the export's own verification) then fails."""
        import types

        model = self.load_model(path, dtype=dtype)
        for layer in model.sublayers():
            if getattr(layer, "attn_func", None) is not None:  # Qwen2Attention keeps its attention function as an attribute
                layer.attn_func = _traceable_attention
            if hasattr(layer, "cos_cached") and hasattr(layer, "max_seq_len_cached"):
                layer.forward = types.MethodType(_cached_rotary_tables, layer)
        return model

    def static_step(self, model):
        # the in-place step program, built from the same layers as the decode runner, wherever that runner applies
        from .llama_decode import static_step
        from .qwen2_decode import Qwen2Decoder

        return static_step(model, Qwen2Decoder)

    def prefix_hooks(self):
        # Qwen2Attention concatenates its cache on axis 1: [batch, prefix_len, kv_heads, head_dim] per layer, the
        # layout qwen_postprocess_past_key_value returns; the default prefix mask padding fits its 2-D and 4-D bool masks.
        from paddlenlp.peft.prefix import qwen_postprocess_past_key_value

        return qwen_postprocess_past_key_value, None

    def prefix_config_kwargs(self, config):
        # Grouped-query attention: the prefix holds keys/values of the kv heads only, each of width hidden / heads.
        kwargs = super().prefix_config_kwargs(config)
        kwargs["multi_query_group_num"] = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return kwargs


FAMILY = Qwen2Family(
    name="qwen2",
    model_types=("qwen2",),
    config_class="Qwen2Config",
    model_class="Qwen2ForCausalLM",
    export_patches=("qwen2_rms_norm",),
    cpu_patches=("qwen2_rms_norm", "qwen2_rotary", "qwen2_supervised_loss", "qwen2_last_logits", "qwen2_segment_attention", "linear_bias_grad"),
    tokenizer_class="Qwen2Tokenizer",
    tokenizer_kind="bpe",
    tokenizer_files={"vocab_file": "vocab.json", "merges_file": "merges.txt"},
    # as Qwen2.5's base models: <|endoftext|> ends documents and pads (the chat format ends replies with <|im_end|>)
    special_tokens={"unk_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT},
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as every Qwen2 model
        max_position_embeddings=1024,
        seq_length=1024,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B / 1.5B / 3B
    ),
    example_checkpoint="Qwen/Qwen2.5-0.5B",
    name_hints=("qwen2",),  # not "qwen": Qwen (v1) and Qwen3 are other designs
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    hf_architecture="Qwen2ForCausalLM",
    hf_model_type="qwen2",
    # input_layernorm -> q/k/v (separate, with biases), post_attention_layernorm -> gate/up (read in parallel)
    shift_smooth_pairing={"fused_qkv": False, "parallel_ffn": True},
    notes=(
        "ChatML: `<|im_start|>user\\n{src}<|im_end|>\\n<|im_start|>assistant\\n{tgt}<|im_end|>`, later turns opened by the "
        "`\\n` after the previous `<|im_end|>`; no system turn, no bos. Every reply's `<|im_end|>` is supervised and ends "
        "generation, also for base models whose eos is `<|endoftext|>`. A reply is tokenized apart from the `assistant\\n` "
        "before it, as generation sees it (transformers' chat template tokenizes them together: the ids differ only for a "
        "reply that starts with a newline). Pads with `<|endoftext|>`. The tokenizer keeps "
        "every added token of a transformers folder's tokenizer.json whole. Sliding-window attention and RoPE scaling "
        "are refused when reading a transformers folder (paddlenlp's Qwen2 implements neither)."
    ),
)
