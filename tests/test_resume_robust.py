"""Resuming from a moved output folder and from damaged checkpoints: continue from the newest usable
checkpoint and say so, or stop with one line naming the broken checkpoint and what to do."""
import json
import os
import shutil

import pytest

from test_finetune import RESUME, _assert_same_weights, _lora_weights, finetune, write_data


@pytest.fixture(scope="module")
def interrupted(tiny_dir, tmp_path_factory):
    """(data, folder of a LoRA run stopped after step 3 holding checkpoint-3, LoRA weights after 6 straight steps)."""
    tmp = tmp_path_factory.mktemp("resume_robust")
    data = write_data(str(tmp / "data"))
    assert finetune(tiny_dir("llama"), data, str(tmp / "straight"), *RESUME, "--max_steps", "6") == 0
    assert finetune(tiny_dir("llama"), data, str(tmp / "three"), *RESUME, "--max_steps", "3") == 0
    return data, str(tmp / "three"), _lora_weights(str(tmp / "straight"))


def copy_run(interrupted, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(interrupted[1], out)
    return out


def checkpoints(out):
    return sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))


def one_line_error(capsys, call):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


DAMAGE = {  # file removed from checkpoint-3 -> what the error says about it
    "optimizer": ("optimizer.pdopt", "no optimizer state (optimizer.pdopt)"),
    "trainer_state": ("trainer_state.json", "no trainer_state.json"),
    "adapter_weights": ("lora_model_state.pdparams", "no lora_model_state.pdparams"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_only_checkpoint_is_one_line(tiny_dir, interrupted, tmp_path, capsys, case):
    data, _, _ = interrupted
    out = copy_run(interrupted, tmp_path)
    name, problem = DAMAGE[case]
    os.remove(os.path.join(out, "checkpoint-3", name))
    before = sorted(os.listdir(os.path.join(out, "checkpoint-3")))
    err = one_line_error(capsys, lambda: finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "6"))
    assert err == (f"error: {os.path.join(out, 'checkpoint-3')} can't be resumed from ({problem}) and output_dir holds no "
                   "usable checkpoint; pass --overwrite_output_dir true to start over, or remove it")
    assert sorted(os.listdir(os.path.join(out, "checkpoint-3"))) == before  # left as it was, for the user to look at


def test_broken_newest_checkpoint_falls_back_to_the_one_before(tiny_dir, interrupted, tmp_path, caplog):
    data, _, reference = interrupted
    out = copy_run(interrupted, tmp_path)
    broken = os.path.join(out, "checkpoint-5")  # complete (marked) once, its optimizer state lost since
    shutil.copytree(os.path.join(out, "checkpoint-3"), broken)
    os.remove(os.path.join(broken, "optimizer.pdopt"))
    caplog.clear()
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, out, *RESUME, "--max_steps", "6") == 0
    assert f"{broken} can't be resumed from (no optimizer state (optimizer.pdopt)); passing over it" in caplog.text
    assert f"resuming from the newest usable checkpoint, {os.path.join(out, 'checkpoint-3')}" in caplog.text
    _assert_same_weights(_lora_weights(out), reference)
    assert checkpoints(out) == ["checkpoint-5", "checkpoint-6"]  # the broken one is left alone, the rotation still works


def test_foreign_checkpoint_folder(tiny_dir, interrupted, tmp_path, capsys, caplog):
    """A checkpoint-99/ of the user's own is neither resumed from, nor deleted, nor counted by the rotation."""
    data, _, reference = interrupted
    alone = str(tmp_path / "alone")
    os.makedirs(os.path.join(alone, "checkpoint-99"))
    with open(os.path.join(alone, "checkpoint-99", "notes.txt"), "w") as f:
        f.write("mine")
    err = one_line_error(capsys, lambda: finetune(tiny_dir("llama"), data, alone, *RESUME, "--max_steps", "3"))
    assert err.startswith(f"error: {os.path.join(alone, 'checkpoint-99')} can't be resumed from (no trainer_state.json)")
    assert finetune(tiny_dir("llama"), data, alone, *RESUME, "--max_steps", "6", "--overwrite_output_dir", "true") == 0
    assert checkpoints(alone) == ["checkpoint-6", "checkpoint-99"]
    _assert_same_weights(_lora_weights(alone), reference)
    # starting over again removes the earlier run's checkpoint-6 (the rotation would keep it, the higher
    # step, and delete the new checkpoint-3), and still leaves the user's folder alone
    assert finetune(tiny_dir("llama"), data, alone, *RESUME, "--max_steps", "3", "--overwrite_output_dir", "true") == 0
    assert checkpoints(alone) == ["checkpoint-3", "checkpoint-99"]

    beside = copy_run(interrupted, tmp_path)  # beside a checkpoint of ours: resume from ours
    shutil.copytree(os.path.join(alone, "checkpoint-99"), os.path.join(beside, "checkpoint-99"))
    caplog.clear()
    with caplog.at_level("INFO", logger="paddlellm"):
        assert finetune(tiny_dir("llama"), data, beside, *RESUME, "--max_steps", "6") == 0
    assert f"{os.path.join(beside, 'checkpoint-99')} is not a checkpoint of this run" in caplog.text
    assert checkpoints(beside) == ["checkpoint-6", "checkpoint-99"]
    assert open(os.path.join(beside, "checkpoint-99", "notes.txt")).read() == "mine"
    _assert_same_weights(_lora_weights(beside), reference)


def test_moved_output_folder_resumes(tiny_dir, tmp_path):
    """trainer_state.json records best_model_checkpoint as a path: after `mv run run2` the next save failed
    ("... is not in list") and the advice to rerun looped forever."""
    data = write_data(str(tmp_path / "data"))
    # learning rate 0: every evaluation scores the same, so the best checkpoint stays the first one (saved before the move)
    best = ["--lora", "true", "--save_strategy", "steps", "--save_steps", "2", "--evaluation_strategy", "steps", "--eval_steps", "2",
            "--load_best_model_at_end", "true", "--learning_rate", "0"]
    first = str(tmp_path / "run")
    assert finetune(tiny_dir("llama"), data, first, *best, "--max_steps", "2") == 0
    moved = str(tmp_path / "run2")
    shutil.move(first, moved)
    assert finetune(tiny_dir("llama"), data, moved, *best, "--max_steps", "4") == 0
    with open(os.path.join(moved, checkpoints(moved)[-1], "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 4 and state["best_model_checkpoint"] == os.path.join(moved, "checkpoint-2")
    assert checkpoints(moved) == ["checkpoint-2", "checkpoint-4"]  # save_total_limit 1, plus the best one
