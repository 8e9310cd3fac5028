"""Tiny randomly initialised checkpoints with real tokenizers, built offline.

`paddlellm tiny --family llama --output DIR` writes config, weights and a tokenizer that the
family's paddlenlp classes load with `from_pretrained(DIR)`. The tokenizer is trained here on the
bundled corpus plus the bundled sample data: sentencepiece for the LLaMA/ChatGLM/GLM style,
byte-level BPE for GPT/OPT/Bloom. Nothing is downloaded.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..families import Family, get_family
from ..files import META_FILE
from ..tokenizer_training import corpus_lines, train_bpe, train_sentencepiece

@dataclass
class TinyArgument:
    family: str = field(default="llama", metadata={"help": "Model family: llama, chatglm, chatglm_v2, bloom, gpt-3, opt, glm, qwen2."})
    output: str = field(default=None, metadata={"help": "Folder to write the tiny checkpoint into (required)."})
    vocab_size: int = field(default=600, metadata={"help": "Tokenizer (and model) vocabulary size; beyond what the bundled corpus can learn, reserved tokens fill it."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "Override the family's tiny hidden size."})
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Override the number of layers (default 2)."})
    seed: int = field(default=42, metadata={"help": "Seed of the random initialisation."})
    num_key_value_heads: Optional[int] = field(default=None, metadata={"help": "Grouped-query attention: key/value heads (a divisor of the attention heads; families with a num_key_value_heads config)."})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "Tie the output head to the input embeddings (families with a tie_word_embeddings config)."})
    tokenizer_format: str = field(default="native", metadata={"help": "native: the family's own tokenizer files; json: a byte-level BPE tokenizer.json only, as today's checkpoints without tokenizer.model (families with a fast tokenizer class).", "choices": ["native", "json"]})
    chat_template: str = field(default="none", metadata={"help": "none, or chatml: write a ChatML chat_template.jinja (<|im_start|>role ... <|im_end|>, which becomes the end-of-sequence token).", "choices": ["none", "chatml"]})


# ChatML (Qwen, SmolLM2 and many fine-tunes): each message is <|im_start|>role\ncontent<|im_end|>\n.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_TEMPLATES = {"chatml": CHATML}


def build_json_tokenizer(family: Family, out_dir: str, vocab_size: int, chat_template: str = "none"):
    """A byte-level BPE tokenizer.json only (no tokenizer.model): the family's fast tokenizer class reads it.
    With a ChatML template, <|im_end|> is the end-of-sequence token and no BOS opens a sequence (as SmolLM2);
    else the family's special tokens, with its BOS added by the post-processor (as Llama 3)."""
    import json as _json

    from ..formats.hf import TOKENIZER_JSON
    from ..tokenizer_training import train_tokenizer_json

    if not family.fast_tokenizer_class:
        from ..arguments import UserError

        raise UserError(f"--tokenizer_format json: the {family.name} family has no fast tokenizer class to read a tokenizer.json")
    special = dict(family.special_tokens)
    extra = []
    if chat_template == "chatml":
        special["eos_token"] = "<|im_end|>"
        extra = ["<|im_start|>"]
    names = [special[k] for k in ("unk_token", "bos_token", "eos_token") if k in special]
    train_tokenizer_json(os.path.join(out_dir, TOKENIZER_JSON), vocab_size, names + extra + [special[k] for k in special if special[k] not in names],
                         corpus_lines(), bos=None if chat_template == "chatml" else special.get("bos_token"))
    cfg = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=int(family.tiny_config.get("max_position_embeddings", 2048)))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        _json.dump(cfg, f, indent=2, ensure_ascii=False)
    return family.load_tokenizer(out_dir, chat_template="none")


RESERVED = "<unused_{}>"  # text of the reserved tokens that fill a vocabulary the bundled corpus can't


def reserve_tokens(family: Family, out_dir: str, count: int) -> None:
    """Append `count` reserved tokens to the saved tokenizer's vocabulary: sentencepiece pieces of type UNUSED
    (sentencepiece's own kind for reserved ids, which encoding never produces), or byte-level BPE vocabulary
    entries that no merge builds (never produced by encoding either). Decoding an id gives its <unused_k> text."""
    if family.tokenizer_kind == "sentencepiece":
        from sentencepiece import sentencepiece_model_pb2 as pb

        (name,) = family.tokenizer_files.values()
        path = os.path.join(out_dir, name)
        model = pb.ModelProto()
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
        taken = {p.piece for p in model.pieces}
        new = [t for t in (RESERVED.format(i) for i in range(len(taken) + count)) if t not in taken][:count]
        for text in new:
            model.pieces.add(piece=text, score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    else:
        path = os.path.join(out_dir, family.tokenizer_files["vocab_file"])
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        new = [t for t in (RESERVED.format(i) for i in range(len(vocab) + count)) if t not in vocab][:count]
        first = max(vocab.values()) + 1
        vocab.update({t: first + i for i, t in enumerate(new)})
        with open(path, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)


def build_tokenizer(family: Family, out_dir: str, vocab_size: int, tokenizer_format: str = "native", chat_template: str = "none"):
    """Train and save the family's tokenizer into out_dir (tokenizer_format json: a tokenizer.json only; chat_template
    chatml: with a ChatML chat_template.jinja); returns the loaded paddlenlp tokenizer.

    The bundled corpus supports only so many learned tokens (about 1.6k sentencepiece pieces, 1k byte-level BPE
    tokens): a larger vocab_size is reached with reserved tokens (reserve_tokens), said in one line on stderr."""
    if tokenizer_format == "json":
        tokenizer = build_json_tokenizer(family, out_dir, vocab_size, chat_template)
    else:
        tokenizer = _train_tokenizer(family, out_dir, vocab_size)
    if chat_template != "none":
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATES[chat_template])
        tokenizer = family.load_tokenizer(out_dir)
    learned = len(tokenizer)
    # reserved tokens fill the native tokenizer files only (a tokenizer.json keeps what it learned)
    for _ in range(2 if tokenizer_format == "native" else 0):  # a tokenizer may count tokens outside its vocabulary file (ChatGLM2's commands): check again
        if len(tokenizer) >= vocab_size:
            break
        reserve_tokens(family, out_dir, vocab_size - len(tokenizer))
        tokenizer = family.load_tokenizer(out_dir)
    if len(tokenizer) != learned:
        print(f"paddlellm tiny: the bundled corpus gives the {family.name} tokenizer {learned} tokens; "
              f"{len(tokenizer) - learned} reserved tokens ({RESERVED.format('k')}, never produced by encoding) fill it "
              f"to {len(tokenizer)}", file=sys.stderr)
    return tokenizer


def _train_tokenizer(family: Family, out_dir: str, vocab_size: int):
    lines = corpus_lines()
    if hasattr(family, "train_tokenizer"):  # tokenizers that need more than the generic trainer (ChatGLM, GLM)
        return family.train_tokenizer(out_dir, vocab_size, lines)
    special = list(family.special_tokens.values())
    files = family.tokenizer_files
    if family.tokenizer_kind == "sentencepiece":
        (arg, name), = files.items()
        train_sentencepiece(os.path.join(out_dir, name), vocab_size, special, lines)
    elif family.tokenizer_kind == "bpe":
        train_bpe(os.path.join(out_dir, files["vocab_file"]), os.path.join(out_dir, files["merges_file"]), vocab_size, special, lines)
    else:
        raise ValueError(f"unknown tokenizer kind {family.tokenizer_kind!r}")
    cls = family.paddlenlp_class("tokenizer_class")
    kwargs = {arg: os.path.join(out_dir, name) for arg, name in files.items()}
    tokenizer = cls(**kwargs, **family.special_tokens)
    family.fix_tokenizer(tokenizer)
    tokenizer.save_pretrained(out_dir)
    return family.load_tokenizer(out_dir)


def build_tiny(family_name: str, output: str, vocab_size: int = 600, seed: int = 42, tokenizer_format: str = "native",
               chat_template: str = "none", **overrides) -> str:
    """Write a tiny random checkpoint of `family_name` with its tokenizer into `output`; returns output.
    overrides: config values (hidden_size, num_hidden_layers, num_key_value_heads, tie_word_embeddings, ...)."""
    import paddle

    family = get_family(family_name)
    os.makedirs(output, exist_ok=True)
    tokenizer = build_tokenizer(family, output, vocab_size, tokenizer_format, chat_template)
    config_class = family.paddlenlp_class("config_class")
    cfg = family.tiny_model_config(tokenizer, **overrides)
    config = config_class(**cfg)
    paddle.seed(seed)
    model = family.paddlenlp_class("model_class")(config)
    family.init_new_weights(model)
    model.eval()
    from ..checkpoints import replacing_weights

    with replacing_weights(output):  # an older weight file there would be loaded instead of this one
        model.save_pretrained(output, safe_serialization=True)
    with open(os.path.join(output, META_FILE), "w", encoding="utf-8") as f:
        json.dump({"family": family.name, "kind": "base", "tiny": True, "seed": seed}, f, indent=2)
    return output


def main(argv=None) -> int:
    from ..arguments import parse_args

    (args,) = parse_args([TinyArgument], argv, prog="paddlellm tiny", description=__doc__.splitlines()[0])
    from ..arguments import fail
    from ..families import names

    if args.family not in names():
        fail(f"--family {args.family}: unknown family; choose one of {', '.join(names())}")
    if not args.output:
        fail("--output is required: the folder to write the tiny checkpoint into")
    from ..arguments import UserError, check_can_create

    try:
        check_can_create(args.output, "--output")
    except UserError as e:
        fail(str(e))
    from ..runtime import setup_runtime

    setup_runtime()
    config_class = get_family(args.family).paddlenlp_class("config_class")
    for flag, on in (("num_key_value_heads", args.num_key_value_heads is not None), ("tie_word_embeddings", args.tie_word_embeddings)):
        if on and flag not in inspect.signature(config_class.__init__).parameters:
            fail(f"--{flag}: the {args.family} family's config ({config_class.__name__}) has no such setting")
    heads = get_family(args.family).tiny_config.get("num_attention_heads")
    if args.num_key_value_heads is not None and (args.num_key_value_heads < 1 or (heads and heads % args.num_key_value_heads)):
        fail(f"--num_key_value_heads {args.num_key_value_heads}: must divide the {heads} attention heads")
    extra = {"num_key_value_heads": args.num_key_value_heads}
    if args.tie_word_embeddings:
        extra["tie_word_embeddings"] = True
    try:
        build_tiny(args.family, args.output, args.vocab_size, args.seed, args.tokenizer_format, args.chat_template,
                   hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, **extra)
    except UserError as e:
        fail(str(e))
    print(f"wrote a tiny {args.family} checkpoint to {args.output}")
    return 0
