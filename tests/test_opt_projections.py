"""OPT with word embeddings narrower than its layers (word_embed_proj_dim != hidden_size: project_in/project_out,
OPT-350m's layout): it runs, reads transformers' folders of that shape and exports to them (issue 25, item 1).

tests/fixtures/hf/opt-proj was written by transformers (tests/fixtures/make_opt_projection_fixture.py): no torch here.
"""
import json
import os

import numpy as np

from conftest import ROOT
from paddlellm.families import get_family
from test_hf import hf_tensors, header, raw_logits

os.environ["PADDLELLM_NO_PROGRESS"] = "1"
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "opt-proj")


def test_transformers_opt_with_projections_reads_and_writes_back(tmp_path):
    from paddlellm.formats.hf import export_model

    fam = get_family("opt")
    model = fam.load_model(FIXTURE)
    assert model.config.word_embed_proj_dim == 16 and model.config.hidden_size == 32
    assert list(model.opt.embeddings.project_in.weight.shape) == [16, 32]
    assert list(model.lm_head.decoder_weight.shape) == [model.config.vocab_size, 16]
    ids = np.load(os.path.join(FIXTURE, "input_ids.npy"))
    np.testing.assert_allclose(raw_logits(model, ids), np.load(os.path.join(FIXTURE, "logits.npy")), atol=2e-5, rtol=0)

    out = tmp_path / "out"
    out.mkdir()
    export_model(fam, model, fam.load_tokenizer(FIXTURE), str(out), "float32")
    ours, theirs = header(out / "model.safetensors")[0], header(os.path.join(FIXTURE, "model.safetensors"))[0]
    assert ours == theirs and ours["model.decoder.project_in.weight"] == ("F32", [32, 16])
    assert ours["model.decoder.project_out.weight"] == ("F32", [16, 32])
    a, b = hf_tensors(str(out)), hf_tensors(FIXTURE)
    assert all(np.array_equal(a[k], b[k]) for k in b)  # transformers' own tensors, bit for bit
    cfg = json.load(open(out / "config.json"))
    assert (cfg["hidden_size"], cfg["word_embed_proj_dim"], cfg["tie_word_embeddings"]) == (32, 16, True)


def test_tiny_opt_with_projections_exports_and_reads_back(tmp_path):
    """`paddlellm tiny` of that shape -> export-hf -> read back: the same logits, transformers' names and config."""
    from paddlellm.commands.export_hf import main as main_export
    from paddlellm.commands.tiny import build_tiny

    fam = get_family("opt")
    tiny = build_tiny("opt", str(tmp_path / "tiny"), hidden_size=64, word_embed_proj_dim=32)
    model = fam.load_model(tiny)
    assert model.opt.embeddings.project_in is not None and model.opt.decoder.project_out is not None
    exported = str(tmp_path / "hf")
    assert main_export(["--model_name_or_path", tiny, "--output_path", exported]) == 0
    cfg = json.load(open(os.path.join(exported, "config.json")))
    assert (cfg["hidden_size"], cfg["word_embed_proj_dim"], cfg["architectures"]) == (64, 32, ["OPTForCausalLM"])
    names = header(os.path.join(exported, "model.safetensors"))[0]
    assert names["model.decoder.project_in.weight"] == ("F32", [64, 32])
    assert names["model.decoder.project_out.weight"] == ("F32", [32, 64])
    vocab = model.config.vocab_size
    assert names["lm_head.weight"] == ("F32", [vocab, 32]) and cfg["tie_word_embeddings"] is False  # the tiny head is its own
    ids = np.array([[5, 9, 30, 41, 7, 100, 3, 12]])
    before = raw_logits(model, ids)
    after = raw_logits(fam.load_model(exported), ids)
    assert before.shape == (1, 8, vocab) and np.array_equal(before, after)
