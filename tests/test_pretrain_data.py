"""create_pretraining_data.py: PaddleNLP-identical mmap files, old-format equivalence, dtype choice,
tokenization per family, and one-line errors with nothing written."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd

os.environ["PADDLELLM_NO_PROGRESS"] = "1"

DOCS = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2], [3, 2], [14, 15, 2]]


def paddlenlp_pair(prefix, docs, dtype):
    """What PaddleNLP's create_pretraining_data.py does with these token lists (its builder, directly)."""
    from paddlenlp.data import indexed_dataset

    builder = indexed_dataset.make_builder(prefix + ".bin", "mmap", dtype)
    for ids in docs:
        builder.add_item(ids)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("top,dtype", [(65534, np.uint16), (65535, np.int32), (70000, np.int32)])
def test_files_equal_paddlenlp_builder_output_and_dtype_follows_largest_id(tmp_path, top, dtype):
    from paddlellm.pretrain_data import write_mmap

    docs = DOCS + [[top, 1, 2]]
    stats = write_mmap(str(tmp_path / "ours"), docs)
    paddlenlp_pair(str(tmp_path / "theirs"), docs, dtype)
    assert stats == {"documents": 6, "tokens": sum(map(len, docs)), "dtype": np.dtype(dtype).name}
    for ext in (".bin", ".idx"):
        assert read_bytes(tmp_path / f"ours{ext}") == read_bytes(tmp_path / f"theirs{ext}")
    idx = read_bytes(tmp_path / "ours.idx")
    assert idx[:9] == b"MMIDIDX\x00\x00" and idx[17] == (8 if dtype is np.uint16 else 4)  # paddlenlp's dtype codes
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "theirs.bin", "theirs.idx"]  # no temporary left


def _samples(prefix, seed=3):
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    train, _, _ = build_train_valid_test_datasets([prefix], "mmap", "1,0,0", [40, 0, 0], 8, seed, True)
    return [train[i]["text"].tolist() for i in range(len(train))]


def test_old_npy_npz_pair_gives_the_same_samples(tmp_path):
    from paddlellm.pretrain_data import open_prefix, write_mmap

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, rng.integers(2, 20)).tolist() + [2] for _ in range(30)]
    os.makedirs(tmp_path / "new")
    os.makedirs(tmp_path / "old")
    write_mmap(str(tmp_path / "new" / "c"), docs)
    # PaddleNLP's mid-2023 format: all ids in one array, per-item lengths, cumulative item count per document
    np.save(tmp_path / "old" / "c_ids.npy", np.concatenate(docs).astype(np.uint16))
    np.savez(tmp_path / "old" / "c_idx.npz", lens=np.array([len(d) for d in docs], np.int32), docs=np.arange(len(docs) + 1, dtype=np.int64))
    old, new = _samples(str(tmp_path / "old" / "c")), _samples(str(tmp_path / "new" / "c"))
    assert len(new) >= 40 and old == new
    assert [open_prefix(str(tmp_path / "old" / "c"))[i].tolist() for i in range(30)] == docs


def prepare(model, inputs, prefix, *extra):
    from paddlellm.commands.prepare_pretrain import main

    return main(["--model_name_or_path", model, "--input_path", str(inputs), "--output_prefix", str(prefix), *extra])


TEXTS = ["bob has 5 dogs.", "spell: 7 8 = seven eight", "hello there\nsecond line", "  ", "数字 nine"]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_are_the_tokenizers_plus_eos(family, tiny_dir, tmp_path):
    from paddlellm.families import get_family
    from paddlellm.pretrain_data import open_prefix, read_sidecar

    model = tiny_dir(family)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    assert prepare(model, src, tmp_path / "out" / "c", "--append_eos") == 0
    tok = get_family(family).load_tokenizer(model)
    expected = [tok.convert_tokens_to_ids(tok.tokenize(t)) + [tok.eos_token_id] for t in TEXTS if tok.tokenize(t)]
    data = open_prefix(str(tmp_path / "out" / "c"))
    assert [data[i].tolist() for i in range(len(data))] == expected  # no BOS, one EOS per document, empty ones left out
    side = read_sidecar(str(tmp_path / "out" / "c"))
    assert (side["family"], side["vocab_size"], side["eos_token_id"], side["documents"]) == (family, len(tok), tok.eos_token_id, len(expected))


def test_txt_documents_and_unread_files_are_named(tiny_dir, tmp_path, capsys):
    from paddlellm.pretrain_data import open_prefix

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n", encoding="utf-8")
    (folder / "sub" / "b.jsonl").write_text('{"text": "third doc"}\n\n', encoding="utf-8")
    (folder / "notes.md").write_text("x")
    assert prepare(tiny_dir("llama"), folder, tmp_path / "c") == 0
    err = capsys.readouterr().err
    assert f"not read (1): {folder / 'notes.md'} (not .jsonl, .jsonl.zst or .txt)" in err
    from paddlellm.families import get_family

    tok = get_family("llama").load_tokenizer(tiny_dir("llama"))
    data = open_prefix(str(tmp_path / "c"))
    assert [data[i].tolist() for i in range(3)] == [tok(t, add_special_tokens=False)["input_ids"]
                                                     for t in ("first doc\nstill first", "second doc", "third doc")]


def test_zst_is_read_like_jsonl_and_named_without_a_reader(tiny_dir, tmp_path, capsys, monkeypatch):
    import zstandard

    text = "".join(json.dumps({"text": f"doc {i}: spell {i} {i + 1}"}) + "\n" for i in range(20)).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_bytes(text)
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    assert prepare(tiny_dir("llama"), tmp_path / "plain", tmp_path / "p") == 0
    assert prepare(tiny_dir("llama"), tmp_path / "packed", tmp_path / "z") == 0
    for ext in (".bin", ".idx"):
        assert read_bytes(f"{tmp_path / 'z'}{ext}") == read_bytes(f"{tmp_path / 'p'}{ext}")
    # without a zstd reader the .zst file is named as not read; the rest is still prepared
    monkeypatch.setitem(sys.modules, "zstandard", None)
    capsys.readouterr()
    (tmp_path / "packed" / "b.jsonl").write_bytes(text)
    assert prepare(tiny_dir("llama"), tmp_path / "packed", tmp_path / "z2") == 0
    assert f"not read (1): {tmp_path / 'packed' / 'a.jsonl.zst'} (pip install zstandard to read .zst)" in capsys.readouterr().err


BAD = {
    "invalid_json": (b'{"text": "ok"}\n{"text": oops}\n', "{f}:2: invalid JSON: Expecting value (column 10)"),
    "missing_key": (b'{"text": "ok"}\n{"body": "x"}\n', "{f}:2: no 'text' field (--json_key text)"),
    "not_a_string": (b'{"text": 5}\n', "{f}:1: field 'text' must be a string, got int"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "{f}:2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"),
    "empty_corpus": (b"\n\n", "the corpus has no tokens: nothing written"),
    "only_empty_documents": (b'{"text": ""}\n', "the corpus has no tokens: nothing written"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_dir, tmp_path, capsys):
    content, message = BAD[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare(tiny_dir("llama"), src, out / "c")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + message.format(f=src)
    assert not out.exists()


def test_argument_errors(tiny_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n')
    cases = [
        ([str(tmp_path / "missing")], f"--input_path {str(tmp_path / 'missing')!r}: no such file or folder"),
        ([str(src), "--data_impl", "lazy"], "--data_impl lazy: only mmap files are written (PaddleNLP's default format)"),
        ([str(src), "--workers", "0"], "--workers must be at least 1, got 0"),
    ]
    for (inp, *extra), message in cases:
        with pytest.raises(SystemExit):
            prepare(tiny_dir("llama"), inp, tmp_path / "o" / "c", *extra)
        assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + message
    assert not (tmp_path / "o").exists()


def test_interrupted_writing_leaves_no_files(tmp_path):
    from paddlellm.pretrain_data import write_mmap

    def docs():
        yield [1, 2, 3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_mmap(str(tmp_path / "c"), docs(), {"family": "llama"})
    assert os.listdir(tmp_path) == []


def test_command_line_with_workers_equals_one_process(tiny_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"content": f"doc {i} spell {i}"}) + "\n" for i in range(300)))
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--input_path", str(src), "--json_key", "content", "--append_eos", "--max_doc_num", "290"]
    assert prepare(tiny_dir("gpt-3"), src, one, *common[2:]) == 0
    proc = run_cmd([sys.executable, os.path.join(ROOT, "create_pretraining_data.py"), "--model_name_or_path", tiny_dir("gpt-3"),
                    "--output_prefix", str(two), "--workers", "2", *common])
    assert proc.stdout.startswith(f"wrote {two}.bin/.idx (uint16): 290 documents,")
    for ext in (".bin", ".idx"):
        assert read_bytes(f"{one}{ext}") == read_bytes(f"{two}{ext}")
