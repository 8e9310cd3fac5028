"""Bad data ends with one clear line naming file, line and field, exit 2, and nothing in output_dir."""
import os
import sys

import pytest

from conftest import ROOT, run_cmd

GOOD = '{"src": "a", "tgt": "b"}\n'
CASES = {
    "invalid_json": (GOOD + '{"src": "a", "tgt": }\n', "train.json:2: invalid JSON: Expecting value (column 21)"),
    "missing_src": (GOOD + '{"tgt": "b"}\n', "train.json:2: missing field 'src'"),
    "missing_tgt": ('{"src": "a"}\n', "train.json:1: missing field 'tgt'"),
    "wrong_type": (GOOD + GOOD + '{"src": 5, "tgt": "b"}\n', "train.json:3: field 'src' must be a string or a list of strings, got int"),
    "wrong_item_type": ('{"src": ["a", 1], "tgt": ["b", "c"]}\n', "train.json:1: field 'src' must be a string or a list of strings, got list"),
    "unequal_lists": ('{"src": ["a", "b"], "tgt": ["c"]}\n', "train.json:1: fields 'src' and 'tgt' must have equal lengths (2 != 1 turns)"),
    "not_object": ('["a", "b"]\n', "train.json:1: each line must be a JSON object with 'src' and 'tgt', got list"),
    "empty_file": ("\n\n", "train.json: file holds no examples"),
    "not_utf8": (GOOD + '{"src": "caf\xe9", "tgt": "b"}\n', "train.json:2: not UTF-8 text (byte 0xe9 at byte 13 of the line); save the file as UTF-8"),
}


def finetune(dataset, out, *extra):
    return run_cmd([sys.executable, os.path.join(ROOT, "finetune_generation.py"), "--model_name_or_path", "unused-llama",
                    "--dataset_name_or_path", dataset, "--output_dir", out, *extra], check=False, timeout=120)


def assert_one_line_error(proc, expected_tail, out):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(expected_tail), lines[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_file(tmp_path, case):
    text, expected = CASES[case]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_bytes(text.encode("latin-1" if case == "not_utf8" else "utf-8"))
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(str(tmp_path / "data"), out), expected, out)


def test_windows_files_read_like_any_other(tmp_path):
    """A byte-order mark and CRLF line ends (what Windows editors write) are plain UTF-8 JSONL too."""
    from paddlellm.data import read_records

    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + '{"src": "café", "tgt": "b"}\r\n\r\n{"src": ["x", "y"], "tgt": ["1", "2"]}\r\n'.encode())
    recs = read_records(str(path))
    assert [(r.src, r.tgt, r.raw_src) for r in recs] == [(["café"], ["b"], "café"), (["x", "y"], ["1", "2"], ["x", "y"])]
    assert recs[1].where.endswith("train.json:3")


def test_empty_split_folder(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(str(tmp_path / "data"), out), "train: folder holds no *.json files", out)


def test_missing_dataset_folder(tmp_path):
    out = str(tmp_path / "out")
    proc = finetune(str(tmp_path / "nope"), out)
    assert_one_line_error(proc, "is not a folder; give a folder with train.json and dev.json (or train/ and dev/ folders of *.json)", out)


def test_bad_dev_file_is_reported_too(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(GOOD)
    (tmp_path / "data" / "dev.json").write_text('{"src": "a", "tgt": ["x", "y"]}\n')
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(str(tmp_path / "data"), out), "dev.json:1: fields 'src' and 'tgt' must have equal lengths (1 != 2 turns)", out)


def test_folder_splits_are_read_in_order(tmp_path):
    from paddlellm.data import read_split

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "b.json").write_text('{"src": ["q1", "q2"], "tgt": ["a1", "a2"]}\n')
    (tmp_path / "train" / "a.json").write_text(GOOD)
    recs = read_split(str(tmp_path), "train")
    assert [(r.src, r.tgt) for r in recs] == [(["a"], ["b"]), (["q1", "q2"], ["a1", "a2"])]
    assert recs[1].where.endswith("b.json:1")


def test_tensor_parallel_without_enough_processes_is_refused(tmp_path):
    out = str(tmp_path / "out")
    proc = finetune(os.path.join(ROOT, "data"), out, "--tensor_parallel_degree", "2")
    assert_one_line_error(proc, "--tensor_parallel_degree 2: the model is split over 2 processes but this run has 1; start it with "
                                "python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py ...", out)


BAD_ARGUMENTS = {
    "src_length": (["--src_length", "0"], "--src_length must be at least 1, got 0"),
    "tgt_length": (["--tgt_length", "-3"], "--tgt_length must be at least 1, got -3"),
    "intokens_max_length": (["--intokens", "--intokens_max_length", "0"], "--intokens_max_length must be at least 1, got 0"),
    "lora_rank": (["--lora", "--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    "num_prefix_tokens": (["--prefix_tuning", "--num_prefix_tokens", "0"], "--num_prefix_tokens must be at least 1, got 0"),
    "batch_size": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    "accumulation": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    "top_p": (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    "top_k": (["--top_k", "-2"], "--top_k must be >= 0 (0 = no top-k limit), got -2"),
    "pipeline_lora": (["--pipeline_parallel_degree", "2", "--lora"], "--pipeline_parallel_degree 2 with LoRA: pipeline parallel fine-tunes whole models (SFT) without packing here; use tensor_parallel_degree or data parallel for it"),
    "pipeline_intokens": (["--pipeline_parallel_degree", "2", "--intokens"], "--pipeline_parallel_degree 2 with --intokens: pipeline parallel fine-tunes whole models (SFT) without packing here; use tensor_parallel_degree or data parallel for it"),
    "tensor_parallel_prefix": (["--tensor_parallel_degree", "2", "--prefix_tuning"], "--prefix_tuning with --tensor_parallel_degree 2: paddlenlp's tensor-parallel prefix is laid out differently from a single-card one (its shards can't be merged); train the prefix with data parallel"),
    "learning_rate": (["--learning_rate", "-0.1"], "--learning_rate must not be negative, got -0.1"),
    "lora_and_prefix": (["--lora", "--prefix_tuning"], "choose one of LoRA (--lora / --lora_path) and prefix tuning (--prefix_tuning / --prefix_path)"),
    "lora_path_missing": (["--lora_path", "{tmp}/nope"], "lora_path '{tmp}/nope': no such folder"),
    "lora_path_not_lora": (["--lora_path", "{tmp}"], "lora_path '{tmp}': no lora_config.json (not a folder saved by a lora fine-tuning run)"),
    "prefix_path_not_prefix": (["--prefix_path", "{tmp}"], "prefix_path '{tmp}': no prefix_config.json (not a folder saved by a prefix fine-tuning run)"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_one_line_before_anything_loads(tmp_path, case):
    """Values that paddle would reject later with a traceback (or silently misuse) are refused up front."""
    extra, expected = BAD_ARGUMENTS[case]
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(os.path.join(ROOT, "data"), out, *extra), expected.format(tmp=tmp_path), out)


def test_output_dir_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    proc = finetune(os.path.join(ROOT, "data"), str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: output_dir {str(out)!r} is a file; give a folder"
    assert out.read_text() == "keep me"


def test_output_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    assert_one_line_error(finetune(os.path.join(ROOT, "data"), out),
                          f"output_dir {out!r}: can't create it ({str(tmp_path / 'afile')!r} is a file); choose a writable place", out)


def test_split_file_and_split_folder_together_are_ambiguous(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train.json").write_text(GOOD)
    (tmp_path / "data" / "train" / "more.json").write_text(GOOD)
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(str(tmp_path / "data"), out),
                          f"{tmp_path / 'data'}: holds both train.json and a train/ folder; keep one of them (which one is meant is ambiguous)", out)


@pytest.mark.parametrize("extra, expected", [
    (["--fp16", "true"], "--fp16: mixed precision needs a GPU here; pass --fp16 false to train in float32 on CPU"),
    (["--dtype", "float16"], "--dtype float16: paddle's CPU kernels have no float16 matmul; use --dtype float32 on CPU (or a GPU)"),
], ids=["fp16", "dtype"])
def test_half_precision_on_cpu_is_one_line(tmp_path, extra, expected):
    out = str(tmp_path / "out")
    assert_one_line_error(finetune(os.path.join(ROOT, "data"), out, *extra), expected, out)
