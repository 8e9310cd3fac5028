"""Train small tokenizers offline on the bundled text: sentencepiece (LLaMA/ChatGLM/GLM style) and
byte-level BPE (GPT/OPT/Bloom style). Used by `paddlellm tiny` and by the families whose tokenizers need
more than the generic trainer. No paddle import.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "resources", "corpus.txt")
SAMPLE_DATA = os.path.join(os.path.dirname(HERE), "data")


def corpus_lines() -> List[str]:
    """Bundled text plus the src/tgt text of the bundled sample data (so its words are single tokens)."""
    lines = [l.rstrip("\n") for l in open(CORPUS, encoding="utf-8") if l.strip()]
    for name in ("train.json", "dev.json"):
        path = os.path.join(SAMPLE_DATA, name)
        if os.path.isfile(path):
            for raw in open(path, encoding="utf-8"):
                ex = json.loads(raw)
                for key in ("src", "tgt"):
                    val = ex.get(key)
                    lines += val if isinstance(val, list) else [val]
    return lines


def train_sentencepiece(path: str, vocab_size: int, special: List[str], lines: List[str]) -> None:
    """Train a BPE sentencepiece model at `path`.

    `special` tokens (in order) become user-defined pieces right after the four reserved ids
    <unk>=0 <s>=1 </s>=2 <pad>=3 that sentencepiece always gives; byte fallback keeps any text encodable.
    """
    import sentencepiece as spm

    reserved = {"<unk>", "<s>", "</s>", "<pad>"}
    user = [t for t in special if t not in reserved]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines))
        corpus = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=path[: -len(".model")] if path.endswith(".model") else path,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=user,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    finally:
        os.unlink(corpus)
    vocab = path[: -len(".model")] + ".vocab" if path.endswith(".model") else path + ".vocab"
    if os.path.exists(vocab):
        os.unlink(vocab)
    if not path.endswith(".model"):
        os.replace(path + ".model", path)


def train_bpe(vocab_path: str, merges_path: str, vocab_size: int, special: List[str], lines: List[str]) -> None:
    """Train a GPT-2 style byte-level BPE and write vocab.json + merges.txt; `special` get the first ids."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1, special_tokens=list(dict.fromkeys(special)))
    out = tempfile.mkdtemp()
    vocab_file, merges_file = tok.save_model(out)
    os.replace(vocab_file, vocab_path)
    os.replace(merges_file, merges_path)
    os.rmdir(out)


def train_tokenizer_json(path: str, vocab_size: int, special: List[str], lines: List[str], bos: str = None) -> None:
    """Train a byte-level BPE in the shape of today's checkpoints without tokenizer.model (SmolLM2, Llama 3):
    one tokenizer.json holding vocabulary, merges, the `special` tokens as added tokens (first ids), digits
    split one by one, and a post-processor that opens every sequence with `bos` (None: adds nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = list(dict.fromkeys(special))
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(path)
