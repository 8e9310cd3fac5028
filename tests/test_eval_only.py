"""do_train / do_eval: evaluation-only runs of a fine-tuned model or adapter, and training without evaluation."""
import hashlib
import json
import os

import pytest

from test_finetune import DEV, TRAIN, finetune, write_data


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A tiny LLaMA fine-tuned for 3 steps with SFT and with LoRA, each with the final evaluation it reported."""
    tmp = tmp_path_factory.mktemp("eval_only")
    data = write_data(str(tmp / "data"), dev=TRAIN + DEV)  # 6 dev examples: batches of 3 and of 1 differ
    runs = {}
    for kind, extra in (("sft", ["--learning_rate", "3e-3"]), ("lora", ["--lora", "true", "--learning_rate", "1e-2"])):
        out = str(tmp / kind)
        assert finetune(tiny_dir("llama"), data, out, "--max_steps", "3", *extra) == 0
        with open(os.path.join(out, "eval_results.json")) as f:
            runs[kind] = (out, json.load(f))
    return data, runs


def snapshot(folder):
    """{file: sha256} of everything in folder except the results an evaluation writes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name in ("eval_results.json", "all_results.json"):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


CASES = {
    "sft-batch1": ("sft", ["--per_device_eval_batch_size", "1"], 1e-6),
    "sft-batch3": ("sft", ["--per_device_eval_batch_size", "3"], 1e-6),
    "sft-intokens": ("sft", ["--intokens", "true", "--intokens_max_length", "64", "--per_device_eval_batch_size", "2"], 1e-5),
    "lora-batch3": ("lora", ["--per_device_eval_batch_size", "3"], 1e-6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_only_equals_the_final_evaluation_and_writes_no_weights(tiny_dir, trained, case, caplog):
    data, runs = trained
    kind, extra, tol = CASES[case]
    out, reference = runs[kind]
    # evaluate in place: the folder holding the model is also output_dir, the hardest case for "untouched"
    model = ["--model_name_or_path", out] if kind == "sft" else ["--model_name_or_path", tiny_dir("llama"), "--lora_path", out]
    before = snapshot(out)
    caplog.clear()
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, out, *model, "--do_train", "false", *extra) == 0
    assert "evaluation-only run (do_train false)" in caplog.text
    assert snapshot(out) == before  # weights, checkpoints, configs, tokenizer: byte-identical, nothing added
    with open(os.path.join(out, "eval_results.json")) as f:
        got = json.load(f)
    assert got["eval_tokens"] == reference["eval_tokens"] > 0
    assert got["eval_loss"] == pytest.approx(reference["eval_loss"], rel=tol)
    assert got["eval_accuracy"] == pytest.approx(reference["eval_accuracy"], abs=1e-9)


def test_evaluation_only_with_generation_writes_only_results(tiny_dir, trained, tmp_path):
    from paddlellm.generation import text_metrics

    data, runs = trained
    out = str(tmp_path / "eval")
    assert finetune(tiny_dir("llama"), data, out, "--model_name_or_path", runs["lora"][0], "--do_train", "false",
                    "--eval_with_do_generation", "true", "--save_generation_output", "true") == 0
    assert sorted(os.listdir(out)) == ["all_results.json", "eval_results.json", "generated_output.json"]
    with open(os.path.join(out, "generated_output.json")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "eval_results.json")) as f:
        ev = json.load(f)
    assert len(rows) == len(TRAIN + DEV)
    expected = text_metrics([r["output"] for r in rows], [r["tgt"] for r in rows])
    assert ev["eval_bleu4"] == pytest.approx(expected["bleu4"]) and ev["eval_rougel"] == pytest.approx(expected["rougel"])
    assert ev["eval_loss"] == pytest.approx(runs["lora"][1]["eval_loss"], rel=1e-6)  # reported together with BLEU/ROUGE
    assert ev["eval_adapter"] == os.path.abspath(runs["lora"][0])


def test_do_eval_false_trains_without_evaluating(tiny_dir, tmp_path, caplog):
    data = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, out, "--max_steps", "2", "--lora", "true", "--do_eval", "false",
                        "--evaluation_strategy", "steps", "--eval_steps", "1") == 0
    assert "do_eval false: no evaluation" in caplog.text
    assert os.path.isfile(os.path.join(out, "lora_model_state.pdparams"))
    assert not os.path.exists(os.path.join(out, "eval_results.json"))
    with open(os.path.join(out, "log_history.json")) as f:
        assert not [row for row in json.load(f) if any(k.startswith("eval_") for k in row)]


def _one_line_error(capsys, call):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_do_train_and_do_eval_both_false_is_refused(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = _one_line_error(capsys, lambda: finetune(tiny_dir("llama"), write_data(str(tmp_path / "data")), out,
                                                   "--do_train", "false", "--do_eval", "false"))
    assert err == "error: --do_train false and --do_eval false: nothing to do; do_train false evaluates a model, do_eval false trains without evaluating"
    assert not os.path.exists(out)


def test_evaluation_only_needs_dev_data(tiny_dir, tmp_path, capsys):
    data = str(tmp_path / "data")
    write_data(data)
    os.remove(os.path.join(data, "dev.json"))
    out = str(tmp_path / "out")
    err = _one_line_error(capsys, lambda: finetune(tiny_dir("llama"), data, out, "--do_train", "false"))
    assert err == f"error: {data}: no dev.json and no dev/ folder"
    assert not os.path.exists(out)
