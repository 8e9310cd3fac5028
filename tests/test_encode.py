"""Truncation rules of the family encoder (on LLaMA, whose format is plain concatenation)."""
import os
import sys

import pytest

from conftest import run_cmd
from paddlellm.families import IGNORE, get_family


@pytest.fixture(scope="module")
def llama(tiny_dir):
    fam = get_family("llama")
    return fam, fam.load_tokenizer(tiny_dir("llama"))


def ids(fam, tok, text):
    return fam.encode_text(tok, text)


def test_oldest_turns_are_dropped_first_and_every_kept_reply_is_supervised(llama):
    fam, tok = llama
    bos, eos = tok.bos_token_id, tok.eos_token_id
    q = [ids(fam, tok, t) for t in ("spell: 1", "spell: 2 3", "spell: 4")]
    a = [ids(fam, tok, t) for t in ("one", "two three", "four")]
    src, tgt = ["spell: 1", "spell: 2 3", "spell: 4"], ["one", "two three", "four"]
    full = fam.encode(tok, src, tgt, 100, 100)
    assert not full.truncated
    seq = [bos] + q[0] + a[0] + [eos] + q[1] + a[1] + [eos] + q[2] + a[2] + [eos]
    sup = [0] * (1 + len(q[0])) + [1] * (len(a[0]) + 1) + [0] * len(q[1]) + [1] * (len(a[1]) + 1) + [0] * len(q[2]) + [1] * (len(a[2]) + 1)
    assert full.input_ids == seq[:-1]
    assert full.labels == [t if s else IGNORE for t, s in zip(seq[1:], sup[1:])]
    # Context budget that fits turns 2..3 but not turn 1: turn 1 goes, the rest stays intact.
    budget = 1 + len(q[1]) + len(a[1]) + 1 + len(q[2])
    cut = fam.encode(tok, src, tgt, budget, 100)
    assert cut.truncated
    seq2 = [bos] + q[1] + a[1] + [eos] + q[2] + a[2] + [eos]
    assert cut.input_ids == seq2[:-1]
    # Budget smaller than the final prompt alone: only its end is kept, after <s>.
    tiny = fam.encode(tok, src, tgt, 3, 100)
    assert tiny.input_ids[:3] == [bos] + q[2][-2:]
    assert tiny.labels[2:] == a[2] + [eos]


def test_final_reply_is_cut_to_tgt_length_without_eos(llama):
    fam, tok = llama
    reply = ids(fam, tok, "one two three four five six")
    ex = fam.encode(tok, ["spell: 1 2 3 4 5 6"], ["one two three four five six"], 100, 3)
    assert ex.truncated
    assert [l for l in ex.labels if l != IGNORE] == reply[:3]  # cut, so no </s>


def test_encode_records_counts_truncated(llama, caplog):
    from paddlellm.data import Record, encode_records

    fam, tok = llama
    recs = [Record(["spell: 1 2 3 4 5 6"], ["one two three four five six"], "x:1"), Record(["spell: 1"], ["one"], "x:2")]
    with caplog.at_level("INFO", logger="paddlellm"):
        examples, stats = encode_records(fam, tok, recs, 100, 4, "train")
    assert stats == {"examples": 2, "truncated": 1, "dropped": 0} and len(examples) == 2
    assert "train: 2 examples, 1 truncated to src_length=100/tgt_length=4, 0 dropped" in caplog.text


def test_tiny_command_writes_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "tiny-opt")
    proc = run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "opt", "--output", out, "--num_hidden_layers", "1"])
    assert proc.stdout.strip().endswith(f"wrote a tiny opt checkpoint to {out}")
    fam = get_family("opt")
    model = fam.load_model(out)
    assert model.config.num_hidden_layers == 1
    assert sorted(os.listdir(out)) == sorted(["config.json", "generation_config.json", "merges.txt", "model.safetensors", "paddlellm_meta.json",
                                              "special_tokens_map.json", "tokenizer_config.json", "vocab.json"])
    (tmp_path / "afile").write_text("x")
    blocked = run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "opt", "--output", str(tmp_path / "afile")], check=False)
    assert blocked.returncode == 2 and blocked.stderr.strip() == f"error: --output {str(tmp_path / 'afile')!r} is a file; give a folder"
    bad = run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "gpt4", "--output", str(tmp_path / "x")], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: --family gpt4: unknown family; choose one of llama, chatglm, chatglm_v2, bloom, gpt-3, opt, glm, qwen2"
    assert not os.path.exists(tmp_path / "x")
