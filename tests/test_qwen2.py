"""Qwen2 against the transformers-made tiny Qwen2 (tests/fixtures/hf/qwen2, see make_hf_chat_fixtures.py): its tokenizer
gives transformers' ids, the folder's chat template gives the ids of transformers' apply_chat_template and the family's
own ChatML format (--chat_template none) the same without the template's default system turn, the label mask of a multi-turn conversation is exact, and greedy generation gives transformers'
tokens, one prompt at a time and left-padded together. Logits and export-hf are covered in test_hf.py."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT
from paddlellm.families import IGNORE, get_family

FOLDER = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")


def read(name):
    with open(os.path.join(FOLDER, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def qwen2():
    from paddlellm.loading import load_for_inference

    model, tok, fam, _ = load_for_inference(FOLDER)
    return fam, tok, model


def turns(messages):
    """(src, tgt) lists of a conversation, without its system message."""
    src = [m["content"] for m in messages if m["role"] == "user"]
    tgt = [m["content"] for m in messages if m["role"] == "assistant"]
    return src, tgt


def without_system(ids, tok):
    """The template's ids from the first user turn on (the template prepends a system turn when there is none)."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    second = [i for i, t in enumerate(ids) if t == start][1]
    return ids[second:]


def test_tokenizer_gives_transformers_ids_and_text(qwen2):
    fam, tok, _ = qwen2
    tokens = read("tokens.json")
    for i, text in enumerate(tokens["texts"]):
        ids = fam.encode_text(tok, text)
        assert ids == tokens["ids"][i], text
        assert tok(text)["input_ids"] == tokens["ids_special"][i], text  # Qwen2 adds no bos/eos
        assert tok.decode(ids) == tokens["decoded"][i]
        assert tok.decode(ids, skip_special_tokens=True) == tokens["decoded_skip_special"][i]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [468, 469, 470]


def test_chatml_prompts_and_label_mask_equal_the_chat_template(qwen2):
    """The folder's chat template (used by default) gives transformers' apply_chat_template ids exactly, its default
    system turn and a conversation's own system message included; --chat_template none gives the family's own ChatML,
    the same ids without the template's default system turn. Both supervise exactly every reply and its <|im_end|>."""
    fam, tok, _ = qwen2
    own = fam.load_tokenizer(FOLDER, chat_template="none")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = fam.encode_text(tok, "\n")
    for conv in read("chat.json")["conversations"]:
        src, tgt = turns(conv["messages"])
        system = conv["messages"][0]["content"] if conv["messages"][0]["role"] == "system" else None
        # the prompt for the final reply: transformers' apply_chat_template(..., add_generation_prompt=True)
        assert fam.generation_prompt(tok, src, tgt[:-1], 4096, system=system) == conv["prompt_ids"]
        if system is None:
            assert fam.generation_prompt(own, src, tgt[:-1], 4096) == without_system(conv["prompt_ids"], tok)
        cases = [(own, without_system(conv["full_ids"], tok))] if system else \
            [(tok, conv["full_ids"]), (own, without_system(conv["full_ids"], tok))]
        for t, full in cases:
            # the training example: the whole conversation (but the "\n" after the last <|im_end|>), shifted once
            ex = fam.encode(t, src, tgt, 4096, 4096)
            assert full[-2:] == [im_end] + newline
            assert ex.input_ids == full[:-2] and len(ex.labels) == len(ex.input_ids)
            # supervised: exactly every reply and its <|im_end|>
            want = [IGNORE] * len(ex.labels)
            pos = len(conv["full_ids"]) - len(without_system(conv["full_ids"], tok)) if t is tok else 0
            for i, (q, a) in enumerate(zip(src, tgt)):
                prompt = fam.encode_text(tok, ("\n" if i else "") + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
                reply = fam.encode_text(tok, a) + [im_end]
                pos += len(prompt)
                want[pos - 1 : pos - 1 + len(reply)] = reply
                pos += len(reply)
            assert ex.labels == want
            assert sum(l != IGNORE for l in ex.labels) == sum(len(fam.encode_text(tok, a)) + 1 for a in tgt)


@pytest.mark.parametrize("own_loop", [True, False], ids=["decode_loop", "generate"])
def test_greedy_chat_generation_equals_transformers(qwen2, own_loop):
    from paddlellm.generation import generate_ids

    fam, tok, model = qwen2
    chat = read("chat.json")
    assert fam.stop_token_id(tok) == chat["eos_token_id"][0]  # <|im_end|> ends a reply
    prompts = [c["prompt_ids"] for c in chat["conversations"]]
    want = [c["generate"] for c in chat["conversations"]]
    assert all(w[-1] == fam.stop_token_id(tok) for w in want)  # each reply ended by <|im_end|> within 12 tokens
    for prompt, reply in zip(prompts, want):  # one prompt at a time (replies are cut before the stop token)
        assert generate_ids(model, tok, fam, [prompt], 12, own_loop=own_loop) == [reply[:-1]]
    batch = chat["batch_generate"]
    assert batch["pad_token_id"] == tok.pad_token_id and batch["padding_side"] == "left"
    got = generate_ids(model, tok, fam, prompts, 12, own_loop=own_loop)  # left-padded together
    assert got == [w[: w.index(fam.stop_token_id(tok))] for w in batch["new_tokens"]]
    assert np.array(fam.generation_inputs(tok, prompts)["input_ids"]).tolist() == batch["input_ids"]


def test_transformers_config_refusals():
    fam = get_family("qwen2")
    cfg = read("config.json")
    assert fam.hf_config_to_paddle(cfg)["num_key_value_heads"] == 2
    for change, message in ((dict(use_sliding_window=True, sliding_window=64), "use_sliding_window=true"),
                            (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "RoPE scaling 'yarn'"),
                            (dict(hidden_act="gelu"), "hidden_act 'gelu'")):
        with pytest.raises(ValueError, match=message):
            fam.hf_config_to_paddle({**cfg, **change})


def test_every_added_token_of_tokenizer_json_stays_whole(tmp_path):
    """Qwen2.5's tokenizer.json adds more tokens than ChatML (fim, vision, <tool_call>): each is one token in text, and
    the text around it is tokenized as transformers does (no whitespace stripped next to it)."""
    import shutil

    folder = tmp_path / "qwen2"
    shutil.copytree(FOLDER, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    extra = {"<|fim_prefix|>": True, "<tool_call>": False}  # content -> transformers' "special" flag
    for i, (content, special) in enumerate(extra.items()):
        spec["added_tokens"].append(dict(id=471 + i, content=content, special=special, single_word=False, lstrip=False,
                                         rstrip=False, normalized=False))
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    fam = get_family("qwen2")
    tok = fam.load_tokenizer(str(folder))
    ids = fam.encode_text(tok, "b<|fim_prefix|>b <tool_call> b\n<|im_start|>b")
    b, space, space_b, newline = (fam.encode_text(tok, t) for t in ("b", " ", " b", "\n"))
    assert ids == b + [471] + b + space + [472] + space_b + newline + [469] + b
    assert tok.decode(ids) == "b<|fim_prefix|>b <tool_call> b\n<|im_start|>b"
