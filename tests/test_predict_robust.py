"""predict_generation.py edge cases: seeds out of range, sampling ranges named one by one, temperature 0 = greedy
(as in the server), a folder given as data_file, and --resume on a finished output with changed settings."""
import json
import os

import pytest

from test_predict import DATA, assert_error, cli, predict, read_jsonl, write_jsonl

os.environ["PADDLELLM_NO_PROGRESS"] = "1"


def test_out_of_range_arguments_are_one_line_before_any_file(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    data = write_jsonl(tmp_path / "data.json", DATA[:2])
    out = str(tmp_path / "out.json")
    base = ["--model_name_or_path", model, "--data_file", data, "--output_file", out]
    for flag, value, expected in [
        ("--seed", "-1", "--seed must be in 0 .. 2**64 - 1, got -1"),
        ("--seed", str(2**64), f"--seed must be in 0 .. 2**64 - 1, got {2**64}"),
        ("--top_k", "-1", "--top_k must be >= 0 (0 = no top-k limit), got -1"),
        ("--top_p", "1.5", "--top_p must be in (0, 1], got 1.5"),
        ("--top_p", "0", "--top_p must be in (0, 1], got 0.0"),
        ("--temperature", "-0.5", "--temperature must be >= 0 (0 = greedy), got -0.5"),
        ("--repetition_penalty", "0", "--repetition_penalty must be > 0, got 0.0"),
    ]:
        assert_error(cli(*base, flag, value), expected, out)
    assert sorted(os.listdir(tmp_path)) == ["data.json"]  # no output, no .partial
    assert_error(cli("--model_name_or_path", model, "--data_file", str(tmp_path), "--output_file", out),
                 f"data_file {str(tmp_path)!r} is a folder; give the JSONL file to predict on (e.g. {os.path.join(str(tmp_path), 'dev.json')!r})",
                 out)


def test_temperature_zero_is_greedy_and_top_seed_samples(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    data = write_jsonl(tmp_path / "data.json", DATA)
    common = ["--model_name_or_path", model, "--data_file", data, "--src_length", "32", "--tgt_length", "6", "--batch_size", "3"]
    greedy, zero, sampled = (str(tmp_path / n) for n in ("greedy.json", "zero.json", "sampled.json"))
    assert predict(*common, "--output_file", greedy) == 0  # top_k 1: greedy
    # top_k 0 would sample; temperature 0 makes it greedy, as a request with temperature 0 does in the server.
    assert predict(*common, "--output_file", zero, "--top_k", "0", "--temperature", "0") == 0
    assert read_jsonl(zero) == read_jsonl(greedy)
    # The largest seed works: batch seeds wrap around instead of overflowing paddle.seed.
    assert predict(*common, "--output_file", sampled, "--top_k", "0", "--temperature", "5", "--seed", str(2**64 - 1)) == 0
    assert len(read_jsonl(sampled)) == len(DATA) and read_jsonl(sampled) != read_jsonl(greedy)


def test_resume_on_a_finished_output_compares_settings(tiny_dir, tmp_path, monkeypatch, capsys):
    import paddlellm.generation as generation

    model = tiny_dir("llama")
    data = write_jsonl(tmp_path / "data.json", DATA)
    out = str(tmp_path / "pred.json")
    common = ["--model_name_or_path", model, "--data_file", data, "--output_file", out, "--src_length", "32"]
    assert predict(*common, "--tgt_length", "6") == 0
    first = read_jsonl(out)
    with open(out + ".settings.json") as f:
        assert json.load(f)["settings"]["tgt_length"] == 6
    assert sorted(os.listdir(tmp_path)) == ["data.json", "pred.json", "pred.json.settings.json"]

    real = generation.generate_ids
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate_ids", counting)
    capsys.readouterr()
    assert predict(*common, "--tgt_length", "6", "--resume", "true") == 0 and calls == []  # same settings: nothing to do
    assert "already complete (6 lines, same data and settings); nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict(*common, "--tgt_length", "2", "--resume", "true")
    assert e.value.code == 2 and calls == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume: {out} was written with other settings (tgt_length 6 -> 2); drop --resume to generate it again")
    assert read_jsonl(out) == first  # left as it was

    # Without a record (an output of an older version): generated again, and recorded.
    os.remove(out + ".settings.json")
    assert predict(*common, "--tgt_length", "2", "--resume", "true") == 0 and calls
    assert "records no settings to compare" in capsys.readouterr().err
    short = read_jsonl(out)
    assert short != first and all(len(r["output"].split()) <= len(f["output"].split()) for r, f in zip(short, first))
    with open(out + ".settings.json") as f:
        assert json.load(f)["settings"]["tgt_length"] == 2
