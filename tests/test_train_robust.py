"""Fine-tuning robustness (issue 16): one set of weights per folder, evaluation that can't end a run, and
things that used to happen without a word."""
import os

import numpy as np
import pytest

from test_finetune import finetune, write_data


def weight_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".pdparams")) or n.endswith(".index.json"))


def loaded_state(folder):
    """The weights every command would use for `folder` (through the one shared loader)."""
    from paddlellm.loading import load_for_inference

    model = load_for_inference(folder)[0]
    return {k: v.numpy() for k, v in model.state_dict().items()}


def file_state(path):
    from paddlenlp.transformers.model_utils import load_state_dict

    return {k: v.numpy() for k, v in load_state_dict(path).items()}


def test_one_set_of_weights_per_folder(tiny_dir, tmp_path):
    """The issue's repro: merge LoRA into X, fine-tune (SFT) into X, then everything loaded X's stale
    model.safetensors. Each save now replaces the weight files already there."""
    from paddlellm.merge import merge_lora
    from paddlellm.commands.tiny import build_tiny

    base = tiny_dir("llama")
    data = write_data(str(tmp_path / "data"))
    lora = str(tmp_path / "lora")
    assert finetune(base, data, lora, "--lora", "true", "--max_steps", "2", "--learning_rate", "1e-2") == 0
    x = str(tmp_path / "x")
    merge_lora(None, lora, x)
    merged = file_state(os.path.join(x, "model.safetensors"))

    assert finetune(base, data, x, "--max_steps", "2", "--overwrite_output_dir", "true") == 0
    assert weight_files(x) == ["model.safetensors"]
    sft = file_state(os.path.join(x, "model.safetensors"))
    got = loaded_state(x)
    for k in sft:
        np.testing.assert_array_equal(got[k], sft[k], err_msg=k)
    assert any(not np.array_equal(sft[k], merged[k]) for k in sft)  # it really is another model

    merge_lora(None, lora, x)  # and back: the merge replaces the fine-tuned weights
    assert weight_files(x) == ["model.safetensors"]
    assert finetune(base, data, x, "--lora", "true", "--max_steps", "1") == 0  # an adapter run into a model folder
    assert weight_files(x) == ["lora_model_state.pdparams"]
    build_tiny("llama", x)  # and a tiny model written over an adapter folder
    assert weight_files(x) == ["model.safetensors"] and not os.path.exists(os.path.join(x, "lora_config.json"))


def test_output_dir_equal_to_the_model_is_refused(tiny_dir, tmp_path, capsys):
    base = tiny_dir("llama")
    before = sorted(os.listdir(base))
    with pytest.raises(SystemExit) as e:
        finetune(base, write_data(str(tmp_path / "data")), base + "/")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output_dir {base + '/'!r} is the model being fine-tuned (model_name_or_path); write to another folder "
        "(saving would replace the weights training starts from)")
    assert sorted(os.listdir(base)) == before


def test_sft_output_is_model_safetensors_and_every_command_reads_it(tiny_dir, tmp_path, caplog):
    """Full fine-tuning writes its final weights as model.safetensors, the format of merge and `paddlellm tiny`
    (it wrote the Trainer's model_state.pdparams), replacing any weight file already there; its checkpoints
    keep the Trainer's format, and resuming, predict/serve loading, LoRA on top and merging still work."""
    from paddlellm.merge import merge_lora

    base = tiny_dir("llama")
    data = write_data(str(tmp_path / "data"))
    out = str(tmp_path / "sft")
    os.makedirs(out)
    with open(os.path.join(out, "model_state.pdparams"), "wb") as f:
        f.write(b"an earlier save")  # must not remain next to the new weights
    sft = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant"]
    assert finetune(base, data, out, *sft) == 0
    assert weight_files(out) == ["model.safetensors"]
    assert "model_state.pdparams" in os.listdir(os.path.join(out, "checkpoint-2"))  # the Trainer's format, for resuming
    assert os.path.isfile(os.path.join(out, "training_args.bin"))
    final = file_state(os.path.join(out, "model.safetensors"))
    step2 = file_state(os.path.join(out, "checkpoint-2", "model_state.pdparams"))
    start = file_state(os.path.join(base, "model.safetensors"))
    assert final.keys() == step2.keys()
    for k in final:
        np.testing.assert_array_equal(final[k], step2[k], err_msg=k)
    assert any(not np.array_equal(final[k], start[k]) for k in final)  # trained weights, not the base's
    got = loaded_state(out)  # the loader predict and serve use
    for k in final:
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)

    with caplog.at_level("INFO", logger="paddlellm"):  # resuming from the Trainer-format checkpoint
        assert finetune(base, data, out, *sft[2:], "--max_steps", "3") == 0
    assert f"resuming from {os.path.join(out, 'checkpoint-2')}" in caplog.text
    assert weight_files(out) == ["model.safetensors"]
    resumed = file_state(os.path.join(out, "model.safetensors"))
    assert any(not np.array_equal(resumed[k], final[k]) for k in final)  # step 3 was trained and saved

    lora = str(tmp_path / "lora")  # LoRA on the SFT output, then merged into it
    assert finetune(out, data, lora, "--lora", "true", "--max_steps", "1", "--learning_rate", "1e-2") == 0
    merged = str(tmp_path / "merged")
    merge_lora(None, lora, merged)
    m = file_state(os.path.join(merged, "model.safetensors"))
    assert m.keys() == resumed.keys()
    same = [k for k in m if np.array_equal(m[k], resumed[k])]
    assert same and len(same) < len(m)  # untouched layers are the SFT output's, adapted ones moved


GENERATION_EVAL = ["--lora", "true", "--max_steps", "2", "--eval_with_do_generation", "true",
                   "--evaluation_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "2"]


def test_empty_generated_replies_score_zero(tiny_dir, tmp_path, monkeypatch):
    """A model that ends every reply at once (tiny ChatGLM after 2 steps) made paddlenlp's BLEU divide by
    zero before the first checkpoint, and the run's folder was removed."""
    import json

    from paddlellm import trainer

    monkeypatch.setattr(trainer, "generate_replies", lambda model, tok, fam, recs, *a, **k: [""] * len(recs))
    out = str(tmp_path / "out")
    assert finetune(tiny_dir("llama"), write_data(str(tmp_path / "data")), out, *GENERATION_EVAL) == 0
    with open(os.path.join(out, "eval_results.json")) as f:
        ev = json.load(f)
    assert ev["eval_bleu4"] == 0.0 and ev["eval_rouge1"] == 0.0 and ev["eval_exact_match"] == 0.0
    assert os.path.isfile(os.path.join(out, "lora_model_state.pdparams"))


def test_failing_generation_evaluation_does_not_end_training(tiny_dir, tmp_path, monkeypatch, caplog):
    import json

    from paddlellm import trainer

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failure in generate")

    monkeypatch.setattr(trainer, "generate_replies", broken)
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), write_data(str(tmp_path / "data")), out, *GENERATION_EVAL) == 0
    assert "generation evaluation failed at step 1 (RuntimeError: kernel failure in generate); BLEU/ROUGE are left out" in caplog.text
    with open(os.path.join(out, "eval_results.json")) as f:
        ev = json.load(f)
    assert "eval_loss" in ev and "eval_bleu4" not in ev
    assert os.path.isfile(os.path.join(out, "lora_model_state.pdparams"))


def test_bleu_of_no_match_is_zero():
    from paddlellm.generation import text_metrics

    m = text_metrics(["a x", "c"], ["a b", "c"])  # no matching 2-, 3- or 4-gram
    assert m["bleu4"] == 0.0  # paddlenlp's BLEU gives 1.73e-306 here
    assert text_metrics(["", ""], ["a b", "c"])["bleu4"] == 0.0  # and divides by zero here


def test_missing_dev_data_is_said(tiny_dir, tmp_path, caplog):
    data = write_data(str(tmp_path / "data"))
    os.remove(os.path.join(data, "dev.json"))
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, str(tmp_path / "out"), "--lora", "true", "--max_steps", "1",
                        "--load_best_model_at_end", "true") == 0
    assert f"no dev data (dev.json or dev/) in {data}: evaluation and load_best_model_at_end are switched off" in caplog.text


def test_replacing_weights_puts_the_old_files_back_when_the_save_fails(tmp_path):
    from paddlellm.checkpoints import replacing_weights

    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    (tmp_path / "lora_config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")  # not a weight file: never touched
    with pytest.raises(RuntimeError):
        with replacing_weights(str(tmp_path)):
            (tmp_path / "model_state.pdparams").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "lora_config.json", "model.safetensors"]  # the half file is gone
    assert (tmp_path / "model.safetensors").read_bytes() == b"old weights"
    with replacing_weights(str(tmp_path)):
        (tmp_path / "model_state.pdparams").write_bytes(b"new weights")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model_state.pdparams"]
    assert (tmp_path / "model_state.pdparams").read_bytes() == b"new weights"
