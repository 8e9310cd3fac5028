"""The family registry's base class.

Every difference between model families lives in a subclass of :class:`Family` (one module per
family in this package). Code elsewhere asks the family object, never the family's name.

Importing this module must stay cheap (no paddle/paddlenlp at import time): `--help` and argument
errors are answered before the heavy libraries load.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -100  # label of a token that is not supervised


def logits_of(output):
    """The logits of a model's forward output: an output object, a (logits, ...) tuple or a bare tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def with_supervised_token_mean_loss(model):
    """paddlenlp bug workaround (loss counts padding), for models whose forward computes its loss as
    F.cross_entropy(logits, labels) with reduction "mean": paddle then divides by *every* position when
    ignore_index is negative (-100), so prompt and padding tokens dilute the loss and it changes with
    padding. Ignored tokens add exactly 0 to the sum, so rescaling by positions / supervised tokens gives
    the mean over supervised tokens.

    The instance's forward is replaced (LoRAModel calls model.forward directly, so a hook would be
    skipped), keeping the class forward's signature, which PrefixModelForCausalLM and the Trainer inspect.
    Bound with MethodType, so a deepcopy of the model is bound to the copy.
    """
    import inspect
    import types

    cls_forward = type(model).forward
    sig = inspect.signature(cls_forward)

    def forward(self, *args, **kwargs):
        labels = sig.bind(self, *args, **kwargs).arguments.get("labels")
        out = cls_forward(self, *args, **kwargs)
        config = self.config
        if labels is None or (config.tensor_parallel_degree > 1 and config.tensor_parallel_output):
            return out  # no loss, or paddlenlp's tensor-parallel loss, which averages over kept labels itself
        scale = labels.numel().item() / max(int((labels != IGNORE).astype("int64").sum()), 1)
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
            return (out[0] * scale,) + tuple(out[1:])
        out.loss = out.loss * scale
        return out

    forward.__signature__ = sig
    model.forward = types.MethodType(forward, model)
    return model


@dataclass
class Example:
    """One tokenised training example (labels are already shifted: labels[i] is the target of input_ids[i]).

    prefix_len: number of leading tokens that attend bidirectionally to each other (the prompt of a
    prefix-LM family such as ChatGLM v1 or GLM); 0 for a purely causal family.
    block_positions: second position row of 2-D position families (GLM, ChatGLM v1), else None.
    """

    input_ids: List[int]
    labels: List[int]
    positions: List[int]
    prefix_len: int = 0
    block_positions: Optional[List[int]] = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Family:
    """A model family described as data plus a few hooks. Subclasses fill in the fields and override hooks."""

    name: str  # registry key and llm/<folder> name
    model_types: Tuple[str, ...]  # values of config.json "model_type" (or architectures) that mean this family
    config_class: str  # class names inside paddlenlp.transformers
    model_class: str
    tokenizer_class: str
    tokenizer_kind: str  # "sentencepiece" or "bpe": how tiny.py trains a tokenizer for it
    tokenizer_files: Dict[str, str]  # tokenizer __init__ argument -> file name in the model folder
    special_tokens: Dict[str, str]  # tokenizer __init__ argument -> token text (added to a tiny vocabulary)
    tiny_config: Dict[str, Any]  # config kwargs of the tiny random model (vocab_size is set from the tokenizer)
    example_checkpoint: str  # a real public checkpoint name, used in the shipped llm/<family>/*.json
    name_hints: Tuple[str, ...] = ()  # lower-case substrings of real model names that mean this family
    supports: Dict[str, bool] = field(default_factory=dict)  # pretrain sft lora prefix tensor_parallel intokens intokens_prefix (default True)
    lora_target_modules: Optional[List[str]] = None  # regexes; None = every nn.Linear of the model
    prefix_lm: bool = False  # prompt attends bidirectionally (ChatGLM v1, GLM)
    # How paddleslim's Shift/Smooth pair each norm with the Linear layers reading it (PaddleNLP's get_ptq_model_config:
    # fused_qkv, parallel_ffn, skip_norm_list); None: not declared, so shift/smooth are refused for the family.
    shift_smooth_pairing: Optional[Dict[str, Any]] = None
    # Pretraining objectives this family supports; the first is the default (see pretrain_inputs).
    pretrain_objectives: Tuple[str, ...] = ("causal",)
    notes: str = ""  # quirks, shown in llm/<family>/README.md
    # Hugging Face transformers folders (paddlellm/formats/hf.py): the transformers class of the same architecture,
    # or None with the reason in hf_refusal; tensors old transformers versions saved that are not weights.
    hf_architecture: Optional[str] = None
    hf_model_type: str = ""
    hf_refusal: str = ""
    hf_buffers: Tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    # (head, embeddings) transformers names of an LM head paddlenlp keeps untied: exported tied when equal.
    hf_tied_head: Optional[Tuple[str, str]] = None
    pipe_model_class: Optional[str] = None  # paddlenlp's pipeline-parallel (*Pipe) class; None: no pipeline parallel
    # {checkpoint key: key whose tensor-parallel split it shares}: tied weights paddlenlp's TP mappings leave out
    tp_tied_keys: Dict[str, str] = field(default_factory=dict)
    cpu_patches: Tuple[str, ...] = ()  # names in paddlellm.cpu_kernels.PATCHES applied to models trained or run on CPU
    export_patches: Tuple[str, ...] = ()  # of those, the ones applied to a model a static step program is traced from (exact, trace-safe)
    # paddlellm.decode_loop reproduces paddlenlp's generate() token for token for this family (tested per
    # family in tests/test_decode_loop.py); False keeps generate() for predict and serve.
    own_decode_loop: bool = True
    # paddlenlp class that reads a tokenizer.json-only folder (transformers checkpoints without tokenizer.model,
    # and our outputs of such a tokenizer); None: the family's tokenizer class reads every folder.
    fast_tokenizer_class: Optional[str] = None
    # This family's config keys of common settings it names otherwise (e.g. Bloom's n_layer for num_hidden_layers):
    # the tiny command's overrides, given by the common names, are written under these keys.
    config_keys: Dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ loading
    def paddlenlp_class(self, attr: str):
        """Resolve one of the class-name fields (config_class, model_class, tokenizer_class)."""
        module = importlib.import_module("paddlenlp.transformers")
        return getattr(module, getattr(self, attr))

    def load_tokenizer(self, path: str, chat_template: Optional[str] = None):
        """The tokenizer of a model folder, carrying the run's chat template and stop tokens.

        chat_template: None = the folder's own template if it has one, "none" = the family's own format, or a
        template file (see paddlellm/chat_template.py). Prefix-LM families keep their own format (their prompts
        end with mask tokens a template does not place). The stop tokens: generation_config.json's eos_token_id
        (one id or a list) besides the family's end-of-reply token."""
        from .. import chat_template as templates
        from ..formats import hf

        if hf.is_hf_folder(path) or hf.fast_tokenizer_file(self, path):  # transformers / tokenizer.json folders
            tok = hf.load_tokenizer(self, path)
        else:
            tok = self.paddlenlp_class("tokenizer_class").from_pretrained(path)
            self.fix_tokenizer(tok)
        if self.prefix_lm:
            if chat_template and chat_template != templates.NONE:
                from ..arguments import UserError

                raise UserError(f"--chat_template: the {self.name} family's prompts end with its own mask tokens; "
                                f"it keeps its own chat format (pass none)")
            templates.attach(tok, None)
        else:
            templates.attach(tok, templates.resolve(chat_template, path))
        setattr(tok, hf.STOP_ATTR, hf.read_stop_ids(path) if isinstance(path, str) else [])
        return tok

    def fix_tokenizer(self, tokenizer) -> None:
        """Make sure pad/eos are usable (a hook: families whose tokenizers lack a pad token set one)."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else tokenizer.unk_token

    def tiny_token_ids(self, tokenizer) -> Dict[str, Any]:
        """Config entries a tiny model takes from its tokenizer (hook)."""
        return dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    def tiny_model_config(self, tokenizer, **overrides) -> Dict[str, Any]:
        """Config kwargs of a tiny model: tiny_config, then the overrides (common names such as hidden_size or
        num_hidden_layers; None keeps the tiny value) under this family's own keys, then the tokenizer's entries
        (vocab size, special ids). Hook: families with settings that follow these extend it."""
        cfg = dict(self.tiny_config)
        cfg.update({self.config_keys.get(k, k): v for k, v in overrides.items() if v is not None})
        cfg.update(self.tiny_token_ids(tokenizer))
        return cfg

    def load_model(self, path: str, dtype: str = "float32", adapt: bool = True, **config_overrides):
        """The model of folder `path`; adapt=False skips the family's adapt_model workarounds (static export)."""
        from ..formats.quantized import refuse_if_quantized  # float weights only: training, merging (a UserError line)
        from ..formats.static import refuse_if_static

        refuse_if_quantized(path)
        refuse_if_static(path)
        from ..formats import hf

        overrides = {**self.model_config_overrides(), **config_overrides}
        if hf.is_hf_folder(path):  # a transformers folder: converted in memory by paddlellm/formats/hf.py
            model = hf.load_model(self, path, dtype=dtype, **overrides)
        elif int(overrides.get("tensor_parallel_degree") or 1) > 1:  # this rank's shard of every split weight
            from ..cpu_parallel import whole_tensor_split_actions

            cls = self.paddlenlp_class("model_class")
            with whole_tensor_split_actions(cls, self.tp_tied_keys):
                model = cls.from_pretrained(path, dtype=dtype, **overrides)
        else:
            model = self.paddlenlp_class("model_class").from_pretrained(path, dtype=dtype, **overrides)
        return self.adapt_model(model) if adapt else model

    def load_pipe_model(self, path: str, dtype: str = "float32", **config_overrides):
        """This process's pipeline stage of the model of folder `path` (paddlenlp's *Pipe class; needs fleet's
        hybrid groups, i.e. a run under paddle.distributed.launch with pipeline_parallel_degree > 1)."""
        overrides = {**self.model_config_overrides(), **config_overrides}
        cls = self.paddlenlp_class("pipe_model_class")
        if int(overrides.get("tensor_parallel_degree") or 1) > 1:
            from ..cpu_parallel import whole_tensor_split_actions

            with whole_tensor_split_actions(cls, self.tp_tied_keys):
                return cls.from_pretrained(path, dtype=dtype, **overrides)
        return cls.from_pretrained(path, dtype=dtype, **overrides)

    def new_model(self, path: str, dtype: str = "float32", **config_overrides):
        """A randomly initialised model with the config of model folder `path` (pretraining from scratch).
        Seed paddle before calling it: the weights come from paddle's generator."""
        overrides = {**self.model_config_overrides(), **config_overrides}
        config = self.paddlenlp_class("config_class").from_pretrained(path, **overrides)
        config.dtype = dtype
        model = self.paddlenlp_class("model_class").from_config(config, dtype=dtype)
        self.init_new_weights(model)
        return self.adapt_model(model)

    def model_config_overrides(self) -> Dict[str, Any]:
        """Config values every loaded or new model of this family needs (hook; default: none)."""
        return {}

    def adapt_model(self, model):
        """Workarounds every loaded or new model of this family gets (hook; default: none)."""
        return model

    def init_new_weights(self, model) -> None:
        """Fix the random initialisation of a model built from a config, not loaded (hook; default: nothing)."""

    # ------------------------------------------------------------------ Hugging Face transformers folders
    def hf_config_to_paddle(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        """paddlenlp config kwargs for a transformers config.json (hook). ValueError names a setting the
        paddlenlp model can't reproduce."""
        raise ValueError(self.hf_refusal or "no transformers mapping")

    def hf_config_from_paddle(self, config) -> Dict[str, Any]:
        """transformers config.json fields (without architectures/model_type/dtype) of a paddlenlp config (hook)."""
        raise ValueError(self.hf_refusal or "no transformers mapping")

    def hf_name_mappings(self, config):
        """[(transformers name, paddlenlp name, action, index)]: action None, "transpose" or "split" (index-th of
        three equal parts of the last axis). Default: paddlenlp's own converter mapping of the model class."""
        return [(m.source_name, m.target_name, m.action, m.index)
                for m in self.paddlenlp_class("model_class")._get_name_mappings(config)]

    def hf_tokenizer_config(self, tokenizer) -> Dict[str, Any]:
        """tokenizer_config.json fields for transformers' AutoTokenizer (hook; special tokens are added)."""
        return {}

    # ------------------------------------------------------------------ chat format
    def turn_prompt(self, index: int, query: str) -> str:
        """Text of turn `index`'s prompt (0-based) before its reply. Default: the query itself."""
        return query

    def bos_ids(self, tokenizer) -> List[int]:
        """Token ids that open a sequence (before the first prompt)."""
        return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def prompt_end_ids(self, tokenizer) -> List[int]:
        """Token ids that close every prompt (e.g. ChatGLM v1's [gMASK] <sop>)."""
        return []

    def reply_end_ids(self, tokenizer) -> List[int]:
        """Token ids that close every reply and are supervised (the end-of-sequence token)."""
        return [tokenizer.eos_token_id]

    def stop_token_id(self, tokenizer) -> int:
        """The token that ends a generated reply."""
        return self.reply_end_ids(tokenizer)[-1]

    def stop_token_ids(self, tokenizer) -> List[int]:
        """Every token that ends a generated reply: stop_token_id first, then the model folder's
        generation_config.json eos_token_id ones (e.g. Llama 3's <|eot_id|> and <|eom_id|>)."""
        from ..formats.hf import STOP_ATTR  # set by load_tokenizer

        out = [self.stop_token_id(tokenizer)]
        for t in getattr(tokenizer, STOP_ATTR, None) or []:
            if t not in out:
                out.append(t)
        return out

    def encode_text(self, tokenizer, text: str) -> List[int]:
        """Plain token ids of a piece of text, without any special tokens."""
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ examples
    def encode(self, tokenizer, src: Sequence[str], tgt: Sequence[str], src_length: int, tgt_length: int) -> Optional[Example]:
        """Turn a (multi-turn) src/tgt example into an Example, or None when nothing can be supervised.

        Truncation: the final reply keeps at most `tgt_length` tokens (its end is cut, and it then gets
        no end-of-sequence token); the context (earlier turns and the final prompt) keeps at most
        `src_length` tokens: the oldest whole turns are dropped first, then the final prompt loses its
        beginning. Causal families supervise every kept reply; prefix-LM families supervise the final one.
        """
        from .. import chat_template as templates

        if templates.of(tokenizer) is not None:
            return self._encode_with_template(tokenizer, src, tgt, src_length, tgt_length)
        ids, sup, truncated = self._context(tokenizer, src, tgt[:-1], src_length)
        final_reply = self.encode_text(tokenizer, tgt[-1]) + self.reply_end_ids(tokenizer)
        if len(final_reply) > tgt_length:
            final_reply, truncated = final_reply[:tgt_length], True
        prefix_len = len(ids) if self.prefix_lm else 0
        ids += final_reply
        sup += [True] * len(final_reply)
        if not any(sup[1:]):
            return None
        # Shift: position i predicts token i+1.
        labels = [t if s else IGNORE for t, s in zip(ids[1:], sup[1:])]
        input_ids = ids[:-1]
        return self.make_example(input_ids, labels, min(prefix_len, len(input_ids)), truncated)

    def _context(self, tokenizer, src: Sequence[str], history: Sequence[str], src_length: int):
        """Token ids of every turn before the final reply, fitted into src_length.

        Returns (ids, supervised flags, truncated). The oldest whole turns go first; then the final
        prompt loses its beginning but keeps its closing special tokens.
        """
        bos = self.bos_ids(tokenizer)
        p_end = self.prompt_end_ids(tokenizer)
        r_end = self.reply_end_ids(tokenizer)
        prompts = [self.encode_text(tokenizer, self.turn_prompt(i, q)) + p_end for i, q in enumerate(src)]
        replies = [self.encode_text(tokenizer, a) + r_end for a in history]
        n = len(prompts)
        truncated = False

        def context_len(start: int) -> int:
            return len(bos) + sum(len(prompts[i]) + len(replies[i]) for i in range(start, n - 1)) + len(prompts[-1])

        first = 0
        while first < n - 1 and context_len(first) > src_length:
            first, truncated = first + 1, True
        final_prompt = prompts[-1]
        budget = max(src_length - len(bos), len(p_end))
        if len(final_prompt) > budget:
            body = final_prompt[: len(final_prompt) - len(p_end)]
            keep = budget - len(p_end)
            final_prompt = (body[-keep:] if keep > 0 else []) + p_end
            truncated = True
        ids: List[int] = list(bos)
        sup: List[bool] = [False] * len(bos)
        for i in range(first, n - 1):
            ids += prompts[i] + replies[i]
            sup += [False] * len(prompts[i]) + [not self.prefix_lm] * len(replies[i])
        ids += final_prompt
        sup += [False] * len(final_prompt)
        return ids, sup, truncated

    def make_example(self, input_ids: List[int], labels: List[int], prefix_len: int, truncated: bool) -> Example:
        """Attach positions (hook: 2-D position families override)."""
        return Example(input_ids, labels, list(range(len(input_ids))), prefix_len, None, truncated)

    def generation_prompt(self, tokenizer, src: Sequence[str], history: Sequence[str], src_length: int,
                          system: Optional[str] = None) -> List[int]:
        """Token ids of the prompt for generating the reply to src[-1]; history holds the earlier replies.

        system: a system message; with a chat template it is the template's system message, in the family's
        own format (which has no system slot) it opens the first prompt, on a line of its own."""
        from .. import chat_template as templates

        template = templates.of(tokenizer)
        if template is None:
            if system:
                src = ["\n".join([system, src[0]])] + list(src[1:])
            return self._context(tokenizer, src, history, src_length)[0]
        tokens = templates.special_tokens(tokenizer)
        for first in range(len(src)):  # the oldest whole turns go first (re-rendered: a system message stays)
            msgs = templates.ChatTemplate.messages(src[first:], history[first:], system)
            ids = self.encode_text(tokenizer, template.render(msgs, True, tokens))
            if len(ids) <= src_length:
                return ids
        return ids[-src_length:]  # the final prompt alone is too long: it loses its beginning

    # ------------------------------------------------------------------ chat templates (paddlellm/chat_template.py)
    def _template_context(self, tokenizer, src, history, system=None):
        """[(ids, supervised)] pieces of the conversation up to the final prompt, plus the final reply's piece."""
        from .. import chat_template as templates

        template = templates.of(tokenizer)
        pieces = template.pieces(src, history, templates.special_tokens(tokenizer), system)
        return templates.encode_pieces(pieces, lambda t: self.encode_text(tokenizer, t), self.stop_token_ids(tokenizer))

    def _encode_with_template(self, tokenizer, src, tgt, src_length: int, tgt_length: int, system=None) -> Optional[Example]:
        """encode() through the tokenizer's chat template: the same truncation rules, the replies supervised up
        to and including their end-of-turn token (what the template puts after it is context)."""
        truncated = False
        for first in range(len(src)):  # the oldest whole turns go first (re-rendered: a system message stays)
            pieces = self._template_context(tokenizer, src[first:], tgt[first:], system)
            context = pieces[:-1]
            if sum(len(ids) for ids, _ in context) <= src_length:
                break
            truncated = True
        ids = [t for p, _ in context for t in p]
        sup = [s for _, f in context for s in f]  # causal only: load_tokenizer gives prefix-LM families no template
        if len(ids) > src_length:  # the final prompt alone is too long: it loses its beginning
            ids, sup, truncated = ids[-src_length:], sup[-src_length:], True
        reply, flags = pieces[-1]
        n = sum(flags)  # the supervised part (the reply and its end-of-turn token); the rest is the next turn's context
        if n > tgt_length:
            n, truncated = tgt_length, True
        ids += reply[:n]
        sup += [True] * n
        if not any(sup[1:]):
            return None
        labels = [t if s else IGNORE for t, s in zip(ids[1:], sup[1:])]
        return self.make_example(ids[:-1], labels, 0, truncated)

    # ------------------------------------------------------------------ batches
    def build_batch(self, rows: List[List[Example]], pad_id: int, seq_len: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Collate rows of examples (a row holds several examples when packed) into model inputs.

        Each row is the concatenation of its examples, right-padded to `seq_len` (default: the longest
        row). Tokens attend only inside their own example (block-diagonal), causally, except inside a
        prefix-LM prompt; positions restart at every example.
        """
        lengths = [sum(len(e) for e in row) for row in rows]
        S = seq_len or max(lengths)
        B = len(rows)
        input_ids = np.full([B, S], pad_id, dtype="int64")
        labels = np.full([B, S], IGNORE, dtype="int64")
        positions = np.zeros([B, S], dtype="int64")
        block_positions = np.zeros([B, S], dtype="int64")
        attend = np.zeros([B, S, S], dtype=bool)
        simple = all(len(row) == 1 for row in rows) and not self.prefix_lm
        for b, row in enumerate(rows):
            off = 0
            for e in row:
                n = len(e)
                input_ids[b, off : off + n] = e.input_ids
                labels[b, off : off + n] = e.labels
                positions[b, off : off + n] = e.positions
                if e.block_positions is not None:
                    block_positions[b, off : off + n] = e.block_positions
                if not simple:
                    block = np.tril(np.ones([n, n], dtype=bool))
                    block[: e.prefix_len, : e.prefix_len] = True
                    attend[b, off : off + n, off : off + n] = block
                off += n
        pad_mask = np.zeros([B, S], dtype="int64")
        for b, n in enumerate(lengths):
            pad_mask[b, :n] = 1
        return self.model_inputs(input_ids, labels, positions, block_positions, attend, pad_mask, simple)

    def model_inputs(self, input_ids, labels, positions, block_positions, attend, pad_mask, simple) -> Dict[str, np.ndarray]:
        """Express a batch in this family's conventions (hook).

        Default (LLaMA-like): a 2-D padding mask when every row holds one causal example, else a
        4-D bool mask [B, 1, S, S] with True = may attend; 1-D positions.
        """
        out = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        if simple:
            out["attention_mask"] = pad_mask
        else:
            out["attention_mask"] = self.pad_rows_attend_self(attend, pad_mask)[:, None, :, :]
        return out

    @staticmethod
    def pad_rows_attend_self(attend: np.ndarray, pad_mask: np.ndarray) -> np.ndarray:
        """Let padding positions attend to themselves so no softmax row is empty (avoids NaN)."""
        attend = attend.copy()
        B, S = pad_mask.shape
        idx = np.arange(S)
        for b in range(B):
            pads = idx[pad_mask[b] == 0]
            attend[b, pads, pads] = True
        return attend

    def decode_runner(self, model):
        """What drives `model` in the decode loop instead of its own forward, or None (hook; CPU only, see
        generation.generate_batch): an object with prefill(inputs, capacity) -> [batch, vocab] logits of the
        prompt's last position (inputs as generate() receives them; capacity = prompt + new tokens) and
        step(tokens [batch, 1]) -> the next [batch, vocab] logits, giving the model's own logits within float
        rounding. LLaMA's keeps its KV cache in place (families/llama_decode.py)."""
        return None

    def generation_inputs(self, tokenizer, prompts: List[List[int]], max_new_tokens: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Left-padded inputs for generate() (hook: families with 2-D positions or special masks override).

        max_new_tokens: how many tokens will be generated (families that lay out positions in advance need it).
        """
        S = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = np.full([len(prompts), S], pad, dtype="int64")
        mask = np.zeros([len(prompts), S], dtype="int64")
        pos = np.zeros([len(prompts), S], dtype="int64")
        for b, p in enumerate(prompts):
            ids[b, S - len(p) :] = p
            mask[b, S - len(p) :] = 1
            pos[b, S - len(p) :] = np.arange(len(p))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    # ------------------------------------------------------------------ pretraining
    def pretrain_inputs(self, tokenizer, tokens: np.ndarray, objective: str, rngs: Sequence) -> Dict[str, np.ndarray]:
        """Model inputs of a pretraining batch (hook).

        tokens: [B, S + 1] consecutive corpus tokens per row (paddlenlp's GPTDataset samples); rngs: one
        numpy Generator per row, seeded by the sample's index (for objectives that draw something).
        Default, the causal objective: input_ids = tokens[:, :-1] and labels = tokens[:, 1:], shifted
        once here; no paddlenlp causal LM shifts its labels again, and it builds the causal mask itself.
        """
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    # ------------------------------------------------------------------ static-graph export (export_model.py)
    def static_export_refusal(self) -> Optional[str]:
        """Why this family's step program can't be exported, or None when it can (hook)."""
        return None

    def static_export_model(self, path: str, dtype: str = "float32"):
        """The model whose forward is exported (hook: families whose load_model patches instance methods that
        dy2static can't convert return the plain paddlenlp model when the patches don't matter for generation)."""
        return self.load_model(path, dtype=dtype)

    def static_step(self, model):
        """The layer exported as an in-place step program (format 3: the program writes the runner's preallocated KV
        cache in place, formats/static.py InPlaceRunner), or None to export the model's own forward with a concatenated
        cache (format 1). Hook: families with a decode runner return families/inplace_step.RunnerStep over it (their
        *_decode.static_step), when that runner can drive the model."""
        return None

    def static_rules(self):
        """How the runner of an in-place export feeds its program the family's masks and positions (a
        formats/static.InPlaceRules), or None for a causal LM's (a [B, L] mask, [B, L] positions + 1 per step).
        Hook: the prefix LMs ChatGLM and GLM (a 4-D prompt mask, [B, 2, L] positions)."""
        return None

    def static_export_patch(self):
        """A context manager active while the step program is traced (hook: library code that dy2static can't
        convert as is gets an equivalent version). Default: nothing."""
        import contextlib

        return contextlib.nullcontext()

    def static_shell_patch(self, shell):
        """Apply to the generate() host of a static export the generation-time patches load_model applies (hook)."""
        return shell

    def static_shell_overrides(self, config) -> Dict[str, Any]:
        """Config changes that make the generate() host of a static export almost weightless (hook).

        The host never runs a layer (the step program does), so it keeps the config's positions, special ids
        and generation settings, but no layers and a tiny width.
        """
        return {"num_hidden_layers": 0, "hidden_size": 2 * (getattr(config, "num_attention_heads", None) or 1)}

    # ------------------------------------------------------------------ prefix tuning
    def prefix_hooks(self):
        """(postprocess_past_key_value, pad_attention_mask) for paddlenlp's PrefixModelForCausalLM.

        Families that cannot take a prefix raise NotImplementedError with the reason.
        """
        raise NotImplementedError(f"prefix tuning is not supported for the {self.name} family")

    def prefix_config_kwargs(self, config) -> Dict[str, Any]:
        """num_hidden_layers / num_attention_heads / hidden_size / head layout for PrefixConfig."""
        return dict(
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
