"""finetune_generation.py end to end on tiny models: SFT, LoRA and Prefix Tuning for every family."""
import glob
import json
import math
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd
from paddlellm.families import get_family

TRAIN = [
    {"src": "spell: 1 2", "tgt": "one two"},
    {"src": "spell: 3", "tgt": "three"},
    {"src": ["hello", "spell: 4 5"], "tgt": ["hi", "four five"]},  # multi-turn
    {"src": "spell: 6 7 8", "tgt": "six seven eight"},
]
DEV = [{"src": "spell: 2 1", "tgt": "two one"}, {"src": ["hello", "spell: 9"], "tgt": ["hi", "nine"]}]

METHODS = {
    "sft": ["--learning_rate", "3e-3"],
    "lora": ["--lora", "true", "--lora_rank", "4", "--learning_rate", "1e-2"],
    "prefix": ["--prefix_tuning", "true", "--num_prefix_tokens", "16", "--learning_rate", "1e-1"],
}
# what each method must (and must not) leave in output_dir
FILES = {
    "sft": (["model.safetensors", "config.json"], ["model_state.pdparams", "lora_config.json", "prefix_config.json"]),
    "lora": (["lora_model_state.pdparams", "lora_config.json"], ["model.safetensors", "model_state.pdparams"]),
    "prefix": (["prefix_model_state.pdparams", "prefix_config.json"], ["model.safetensors", "model_state.pdparams"]),
}


def write_data(folder, train=TRAIN, dev=DEV):
    os.makedirs(folder, exist_ok=True)
    for name, rows in (("train.json", train), ("dev.json", dev)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def finetune(model, data, out, *extra):
    from paddlellm.commands import finetune as ft

    return ft.run(["--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", out,
                   "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2", "--max_steps", "12",
                   "--logging_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
                   "--src_length", "24", "--tgt_length", "12", "--seed", "1", "--warmup_steps", "0", *extra])


def losses(out):
    with open(os.path.join(out, "log_history.json")) as f:
        return [row["loss"] for row in json.load(f) if "loss" in row and "train_runtime" not in row]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_method(family, method, tiny_dir, tmp_path):
    model = tiny_dir(family)
    data = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    fam = get_family(family)
    if method == "prefix" and not fam.supports.get("prefix"):
        with pytest.raises(SystemExit) as e:
            finetune(model, data, out, *METHODS[method])
        assert e.value.code == 2 and not os.path.exists(out)
        return
    assert finetune(model, data, out, *METHODS[method]) == 0
    curve = losses(out)
    with open(os.path.join(out, "log_history.json")) as f:
        rates = [row["tokens_per_second"] for row in json.load(f) if "loss" in row and "train_runtime" not in row]
    assert len(rates) == 12 and all(r > 0 for r in rates)
    assert len(curve) == 12 and all(math.isfinite(l) for l in curve)
    assert curve[-1] < curve[0] - 0.15, curve  # it learns the 4 examples
    present, absent = FILES[method]
    for name in present + ["tokenizer_config.json", "paddlellm_meta.json", "finetune_args.json", "train_results.json", "eval_results.json"]:
        assert os.path.isfile(os.path.join(out, name)), name
    for name in absent:
        assert not os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "paddlellm_meta.json")) as f:
        meta = json.load(f)
    assert meta["family"] == family and meta["kind"] == {"sft": "full", "lora": "lora", "prefix": "prefix"}[method]
    with open(os.path.join(out, "eval_results.json")) as f:
        ev = json.load(f)
    assert math.isfinite(ev["eval_loss"]) and ev["eval_ppl"] == pytest.approx(math.exp(ev["eval_loss"]), rel=1e-6)
    assert 0.0 <= ev["eval_accuracy"] <= 1.0
    # the output folder alone is enough to load the fine-tuned model and generate
    from paddlellm.data import read_split
    from paddlellm.generation import generate_replies
    from paddlellm.loading import load_for_inference

    m, tok, f, _ = load_for_inference(out)
    replies = generate_replies(m, tok, f, read_split(data, "dev"), 24, 4, batch_size=2)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_eval_with_generation_writes_outputs_and_metrics(tiny_dir, tmp_path):
    from paddlellm.generation import text_metrics

    data = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    assert finetune(tiny_dir("llama"), data, out, "--lora", "true", "--eval_with_do_generation", "true",
                    "--save_generation_output", "true") == 0
    with open(os.path.join(out, "generated_output.json")) as f:
        rows = [json.loads(l) for l in f]
    assert [r["src"] for r in rows] == [d["src"] for d in DEV]
    assert [r["tgt"] for r in rows] == ["two one", "nine"]
    with open(os.path.join(out, "eval_results.json")) as f:
        ev = json.load(f)
    expected = text_metrics([r["output"] for r in rows], [r["tgt"] for r in rows])
    for k in ("bleu4", "rouge1", "rouge2", "rougel"):
        assert ev[f"eval_{k}"] == pytest.approx(expected[k])
    assert math.isfinite(ev["eval_loss"])


def test_text_metrics_known_values():
    from paddlellm.generation import text_metrics

    m = text_metrics(["a b c d", "x y"], ["a b c d", "x z"])
    assert m["exact_match"] == 50.0
    assert m["rouge1"] == pytest.approx(100 * 5 / 6)  # 4 + 1 of 4 + 2 reference unigrams
    assert m["rouge2"] == pytest.approx(100 * 3 / 4)  # 3 + 0 of 3 + 1 reference bigrams
    perfect = text_metrics(["a b c d e"], ["a b c d e"])
    assert perfect["bleu4"] == pytest.approx(100.0) and perfect["rougel"] == pytest.approx(100.0)


def test_eval_loss_does_not_depend_on_eval_batch_size(tiny_dir, tmp_path):
    data = write_data(str(tmp_path / "data"), dev=TRAIN + DEV)
    results = []
    for bs in ("1", "4"):
        out = str(tmp_path / f"out{bs}")
        assert finetune(tiny_dir("llama"), data, out, "--max_steps", "1", "--per_device_eval_batch_size", bs) == 0
        with open(os.path.join(out, "eval_results.json")) as f:
            results.append(json.load(f))
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-5)
    assert results[0]["eval_tokens"] == results[1]["eval_tokens"] > 0


def _lora_weights(out):
    import paddle

    return {k: v.numpy() for k, v in paddle.load(os.path.join(out, "lora_model_state.pdparams")).items()}


def _assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path, caplog):
    data = write_data(str(tmp_path / "data"))
    common = ["--lora", "true", "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "3"]
    straight = str(tmp_path / "straight")
    assert finetune(tiny_dir("llama"), data, straight, *common, "--max_steps", "6") == 0
    resumed = str(tmp_path / "resumed")
    assert finetune(tiny_dir("llama"), data, resumed, *common, "--max_steps", "3") == 0  # "interrupted" after step 3
    caplog.clear()
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, resumed, *common, "--max_steps", "6") == 0
    assert f"resuming from {os.path.join(resumed, 'checkpoint-3')}" in caplog.text
    _assert_same_weights(_lora_weights(resumed), _lora_weights(straight))


RESUME = ["--lora", "true", "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "3"]


@pytest.fixture(scope="module")
def straight_six_steps(tiny_dir, tmp_path_factory):
    """LoRA weights after 6 uninterrupted steps (the reference for the interrupted runs below)."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_data(str(tmp / "data"))
    assert finetune(tiny_dir("llama"), data, str(tmp / "out"), *RESUME, "--max_steps", "6") == 0
    return data, _lora_weights(str(tmp / "out"))


def test_interrupted_run_keeps_its_checkpoint_and_resumes(tiny_dir, straight_six_steps, tmp_path, monkeypatch, capsys):
    from paddlellm.checkpoints import MARKER
    from paddlellm.trainer import SFTTrainer

    data, reference = straight_six_steps
    out = str(tmp_path / "out")  # a new folder: a failure before any checkpoint would remove it
    real = SFTTrainer.compute_loss

    def ctrl_c_in_step_five(self, *args, **kwargs):
        if self.state.global_step >= 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", ctrl_c_in_step_five)
    with pytest.raises(SystemExit) as e:
        finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "6")
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [f"paddlellm: kept {os.path.join(out, 'checkpoint-3')}; rerun the same command to resume from it", "error: interrupted"]
    assert sorted(os.listdir(out)) == ["checkpoint-3"]
    assert os.path.isfile(os.path.join(out, "checkpoint-3", MARKER))

    monkeypatch.setattr(SFTTrainer, "compute_loss", real)
    assert finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "6") == 0
    _assert_same_weights(_lora_weights(out), reference)


def test_resume_skips_a_checkpoint_left_half_saved(tiny_dir, straight_six_steps, tmp_path, caplog):
    import shutil

    from paddlellm.checkpoints import MARKER

    data, reference = straight_six_steps
    out = str(tmp_path / "out")
    assert finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "3") == 0
    # What a run killed while writing checkpoint-5 leaves: weights there, optimizer state and marker not.
    half = os.path.join(out, "checkpoint-5")
    shutil.copytree(os.path.join(out, "checkpoint-3"), half)
    for name in os.listdir(half):
        if name == MARKER or name.startswith("optimizer"):
            os.remove(os.path.join(half, name))
    caplog.clear()
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "6") == 0
    assert f"{half} was not saved completely" in caplog.text
    assert f"resuming from {os.path.join(out, 'checkpoint-3')}" in caplog.text
    assert [d for d in os.listdir(out) if d.startswith("checkpoint-")] == ["checkpoint-6"]
    _assert_same_weights(_lora_weights(out), reference)


def test_two_process_data_parallel(tiny_dir, tmp_path):
    data = write_data(str(tmp_path / "data"), train=TRAIN * 2)
    out = str(tmp_path / "out")
    logs = str(tmp_path / "logs")
    proc = run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
                    os.path.join(ROOT, "finetune_generation.py"), "--model_name_or_path", tiny_dir("llama"),
                    "--dataset_name_or_path", data, "--output_dir", out, "--lora", "true", "--max_steps", "4",
                    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
                    "--evaluation_strategy", "no", "--disable_tqdm", "true", "--src_length", "24", "--tgt_length", "12"],
                   check=False, timeout=600)
    worker_logs = sorted(glob.glob(os.path.join(logs, "workerlog.*")))
    texts = [open(p, errors="replace").read() for p in worker_logs]
    assert proc.returncode == 0, "\n".join(t[-3000:] for t in texts) + proc.stderr[-2000:]
    assert len(worker_logs) == 2
    for text in texts:  # both ranks ran all 4 steps in a 2-process group
        assert "Training completed" in text and "data_parallel_degree          : 2" in text
    assert sorted(os.listdir(out)).count("checkpoint-4") == 1
    assert glob.glob(os.path.join(out, "checkpoint-*")) == [os.path.join(out, "checkpoint-4")]
    assert os.path.isfile(os.path.join(out, "lora_model_state.pdparams"))


def test_lora_target_modules_matching_nothing_is_refused(tiny_dir, tmp_path, capsys):
    data = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        finetune(tiny_dir("llama"), data, out, "--lora", "true", "--lora_target_modules", ".*nomatch")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --lora_target_modules .*nomatch: no layer of the model matches; its Linear layers are ")
    assert "q_proj" in err and "down_proj" in err
    assert not os.path.exists(out)
