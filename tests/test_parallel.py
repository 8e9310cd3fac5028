"""Tensor and pipeline parallelism on two CPU processes (python -m paddle.distributed.launch --nproc_per_node 2).

Tensor parallel (TP=2) runs paddle's model-parallel layers with paddlellm/cpu_parallel.py's CPU ops. For every
family, SFT and LoRA under TP=2 must report the loss curve of one process and, once merge_tp_params.py has
merged the per-rank shards, hold one process's weights (to float rounding) and give its logits. All TP runs
share one launch (tests/parallel_runs.py), so the launcher and paddle start once. Pretraining (LLaMA, GPT-3)
under TP=2 does the same when continued; from scratch, its merged shards are the model the TP run evaluated.
"""
import glob
import json
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd

os.environ["PADDLELLM_NO_PROGRESS"] = "1"

# Three optimisation steps on the four STEP_DATA examples (batch 4); Adam with eps=1 so the update depends on the
# gradient's scale, no clipping, no warm-up. The final evaluation runs on dev (= train).
STEPS = ["--max_steps", "3", "--learning_rate", "0.05", "--adam_epsilon", "1.0", "--max_grad_norm", "0",
         "--logging_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
         "--src_length", "32", "--tgt_length", "16", "--seed", "3", "--warmup_steps", "0",
         "--per_device_train_batch_size", "4"]
KINDS = ["sft", "lora"]


def finetune(*argv):
    from paddlellm.commands import finetune as ft

    assert ft.run(list(argv)) == 0


def losses(out):
    with open(os.path.join(out, "log_history.json"), encoding="utf-8") as f:
        return [row["loss"] for row in json.load(f) if "loss" in row]


def eval_loss(out):
    with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as f:
        return json.load(f)["eval_loss"]


def weights(folder):
    """{name: array} of a model folder (model.safetensors) or a LoRA folder (lora_model_state.pdparams)."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        from safetensors.numpy import load_file

        return load_file(os.path.join(folder, "model.safetensors"))
    import paddle

    return {k: v.numpy() for k, v in paddle.load(os.path.join(folder, "lora_model_state.pdparams")).items()}


def tp_ready_model(tiny_dir, family, root):
    """The family's tiny model, rebuilt with a vocabulary of even size when the default one is odd (TP splits it)."""
    from paddlellm.commands.tiny import build_tiny

    path = tiny_dir(family)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    if vocab % 2 == 0:
        return path
    # the tokenizer trainer's target is 600 plus the family's extra special tokens: aim that much lower
    return build_tiny(family, str(root / f"{family}_even"), vocab_size=600 - (vocab - 600))


def test_cpu_ops_match_one_process_maths(tmp_path):
    """Each replaced op's forward and backward on two processes against the same maths on whole tensors."""
    logs = str(tmp_path / "logs")
    proc = run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
                    os.path.join(ROOT, "tests", "parallel_ops_check.py")], check=False, timeout=300)
    texts = [open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(logs, "workerlog.*")))]
    assert proc.returncode == 0, "\n".join(t[-3000:] for t in texts)
    checked = [line for line in texts[0].splitlines() if line.startswith("checked ")]
    assert len(checked) == 13 and "ALL OPS CHECKED" in texts[0]
    assert "checked c_softmax_with_cross_entropy gradient" in checked


@pytest.fixture(scope="module")
def tp_runs(tiny_dir, step_data, tmp_path_factory):
    """Per (family, kind): the one-process run's folder and the TP=2 run's folder (all TP runs in one launch).

    LoRA starts both runs from one saved, untrained adapter (lora_B = 0): a fresh TP adapter draws its random
    lora_A per rank and could not match one process's draw."""
    root = tmp_path_factory.mktemp("tp")
    runs, launched = {}, []
    for family in FAMILIES:
        model = tp_ready_model(tiny_dir, family, root)
        start = str(root / f"{family}_lora_start")
        finetune("--model_name_or_path", model, "--dataset_name_or_path", step_data, "--output_dir", start,
                 "--lora", "true", "--lora_rank", "4", *STEPS, "--max_steps", "1", "--learning_rate", "0", "--do_eval", "false")
        for kind in KINDS:
            extra = ["--lora_path", start] if kind == "lora" else []
            one, two = str(root / f"{family}_{kind}_1"), str(root / f"{family}_{kind}_tp2")
            common = ["--model_name_or_path", model, "--dataset_name_or_path", step_data, *extra, *STEPS]
            finetune(*common, "--output_dir", one)
            launched.append([*common, "--output_dir", two, "--tensor_parallel_degree", "2"])
            runs[family, kind] = (model, one, two)
    plan = root / "runs.json"
    plan.write_text(json.dumps(launched))
    logs = str(root / "logs")
    proc = run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
                    os.path.join(ROOT, "tests", "parallel_runs.py"), str(plan)], check=False, timeout=1200)
    texts = [open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(logs, "workerlog.*")))]
    assert proc.returncode == 0, "\n".join(t[-4000:] for t in texts) + proc.stderr[-2000:]
    assert "CPU tensor parallel: c_identity, mp_allreduce, c_concat, c_split, c_softmax_with_cross_entropy" in texts[0]
    return runs


def merged(tp_folder, expect=None):
    """merge_tp_params.py's work (paddlellm.merge.merge_tp) on a TP output folder, in this process (no second start
    of paddle; the script itself: test_merge), once per folder. expect: the (kind, degree) it must report."""
    from paddlellm.merge import merge_tp

    out = tp_folder + "_merged"
    if not os.path.isdir(out):
        kind_degree = merge_tp(tp_folder, out)
        assert expect is None or kind_degree == expect
    return out


def assert_merged_equals(got, ref, start, label):
    """The merged weights equal one process's (rtol 1e-5, atol 1e-6), and they moved from `start`."""
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{label}: {k}")
    assert max(float(np.abs(ref[k] - start[k]).max()) for k in ref) > 1e-3  # the weights compared did move


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_matches_one_process(tp_runs, family, kind):
    model, one, two = tp_runs[family, kind]
    shards = sorted(os.listdir(two))
    prefix = "lora_model_state" if kind == "lora" else "model_state"
    assert f"{prefix}.tp00.pdparams" in shards and f"{prefix}.tp01.pdparams" in shards  # the Trainer's per-rank shards
    expected = losses(one)
    assert len(expected) == 3 and expected[-1] < expected[0]  # the run really trained
    assert losses(two) == pytest.approx(expected, rel=1e-5)
    assert eval_loss(two) == pytest.approx(eval_loss(one), rel=1e-5)
    start = weights(model) if kind == "sft" else weights(os.path.join(os.path.dirname(one), f"{family}_lora_start"))
    assert_merged_equals(weights(merged(two)), weights(one), start, f"{family} {kind}")


def folder_logits(model_name_or_path=None, lora_path=None):
    """Logits of two src/tgt examples (laid out as in training) from a folder loaded as predict loads it."""
    import paddle

    from paddlellm.families import logits_of
    from paddlellm.loading import load_for_inference

    model, tok, fam, _ = load_for_inference(model_name_or_path, lora_path)
    model.eval()
    examples = [fam.encode(tok, [s], [t], 32, 16) for s, t in (("spell: 1 2 3", "one two three"), ("hello", "hi"))]
    batch = fam.build_batch([[e] for e in examples], tok.pad_token_id)
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k not in ("labels", "loss_mask")}
    with paddle.no_grad():
        return logits_of(model(**inputs)).astype("float32").numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_shards_give_one_process_logits(tp_runs, family, kind):
    model, one, two = tp_runs[family, kind]
    if kind == "sft":
        got, ref = folder_logits(merged(two)), folder_logits(one)
    else:  # a merged LoRA folder records its base model, as the one-process adapter folder does
        got, ref = folder_logits(lora_path=merged(two)), folder_logits(lora_path=one)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_predict_on_merged_tp_folder(tp_runs, tmp_path):
    _, one, two = tp_runs["llama", "sft"]
    data = tmp_path / "prompts.json"
    data.write_text("".join(json.dumps({"src": s}) + "\n" for s in ("spell: 1 2", "spell: 7 8 9", "hello")))
    outputs = []
    for folder in (one, merged(two)):
        out = str(tmp_path / f"{os.path.basename(folder)}.json")
        run_cmd([sys.executable, os.path.join(ROOT, "predict_generation.py"), "--model_name_or_path", folder,
                 "--data_file", str(data), "--output_file", out, "--src_length", "32", "--tgt_length", "6"],
                env={"PADDLELLM_NO_PROGRESS": "1"}, timeout=300)
        with open(out, encoding="utf-8") as f:
            outputs.append([json.loads(line)["output"] for line in f])
    assert len(outputs[0]) == 3 and outputs[1] == outputs[0]


def test_tensor_parallel_sizes_must_divide(tiny_dir):
    # (prefix tuning under TP and too few processes: tests/test_data_errors.py)
    from paddlellm.arguments import UserError
    from paddlellm.families import get_family
    from paddlellm.tuning import check_tensor_parallel_shapes

    folder = tiny_dir("chatglm_v2")  # its tiny vocabulary (600 + 9 special tokens) is odd
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    assert vocab % 2 == 1
    with pytest.raises(UserError) as e:
        check_tensor_parallel_shapes(get_family("chatglm_v2"), folder, 2)
    assert str(e.value) == (f"--tensor_parallel_degree 2: {folder}/config.json has vocab_size {vocab}, which does not "
                            "split into 2 equal parts; choose a degree that divides it")
    check_tensor_parallel_shapes(get_family("llama"), tiny_dir("llama"), 2)  # 600 words, 4 heads: fine
    # pretraining from scratch checks the vocabulary it pads, not config.json's
    check_tensor_parallel_shapes(get_family("chatglm_v2"), folder, 2, {"vocab_size": (640, "--pad_vocab_to_multiple_of 128 gives")})
    with pytest.raises(UserError) as e:
        check_tensor_parallel_shapes(get_family("llama"), tiny_dir("llama"), 2, {"vocab_size": (603, "--pad_vocab_to_multiple_of 3 gives")})
    assert str(e.value) == ("--tensor_parallel_degree 2: --pad_vocab_to_multiple_of 3 gives vocab_size 603, which does not split "
                            "into 2 equal parts; choose a degree that divides it")


# ------------------------------------------------------------------ pipeline parallel (LLaMA)
def test_pipeline_parallel_llama_matches_one_process(tp_runs, step_data, tmp_path):
    model, one, _ = tp_runs["llama", "sft"]
    out, logs = str(tmp_path / "pp2"), str(tmp_path / "logs")
    proc = run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
                    os.path.join(ROOT, "finetune_generation.py"), "--model_name_or_path", model,
                    "--dataset_name_or_path", step_data, "--output_dir", out, "--pipeline_parallel_degree", "2", *STEPS],
                   check=False, timeout=600)
    texts = [open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(logs, "workerlog.*")))]
    assert proc.returncode == 0, "\n".join(t[-4000:] for t in texts) + proc.stderr[-2000:]
    assert len(texts) == 2  # rank 0 logs (the others log warnings only); rank 1 wrote stage 1's weights
    assert "CPU pipeline parallel: stages exchange activations with gloo's isend/irecv" in texts[0]
    assert "full fine-tuning, pipeline stage 0 of 2" in texts[0]
    assert "pipeline parallel: evaluation is off" in texts[0]
    assert {"model_state.pp00.pdparams", "model_state.pp01.pdparams"} <= set(os.listdir(out))
    assert losses(out) == pytest.approx(losses(one), rel=1e-5)  # the same loss curve, step by step
    got, ref = weights(merged(out)), weights(one)  # merge_tp_params.py joins the stages
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(folder_logits(merged(out)), folder_logits(one), rtol=1e-5, atol=1e-5)
    # a stage missing: one line, nothing written
    import shutil

    partial, target = str(tmp_path / "partial"), str(tmp_path / "partial-merged")
    shutil.copytree(out, partial)
    os.remove(os.path.join(partial, "model_state.pp01.pdparams"))
    proc = run_cmd([sys.executable, os.path.join(ROOT, "merge_tp_params.py"), "--model_name_or_path", partial,
                    "--merge_model_path", target], check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {partial}: pipeline stages pp01 are missing"
    assert not os.path.exists(target)


@pytest.mark.parametrize("extra, message", [
    (["--model_name_or_path", "bloom"], "--pipeline_parallel_degree 2: paddlenlp has no pipeline-parallel model class for the bloom "
                                        "family; use tensor_parallel_degree or data parallel instead"),
    (["--model_name_or_path", "llama", "--lora", "true"],
     "--pipeline_parallel_degree 2 with LoRA: pipeline parallel fine-tunes whole models (SFT) without packing here; "
     "use tensor_parallel_degree or data parallel for it"),
    (["--model_name_or_path", "llama"], "--pipeline_parallel_degree 2: the model is split over 2 processes but this run has 1; "
                                        "start it with python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py ..."),
])
def test_pipeline_parallel_refusals(tiny_dir, step_data, tmp_path, extra, message):
    extra = [tiny_dir(a) if i and extra[i - 1] == "--model_name_or_path" else a for i, a in enumerate(extra)]
    out = str(tmp_path / "out")
    proc = run_cmd([sys.executable, os.path.join(ROOT, "finetune_generation.py"), *extra, "--dataset_name_or_path", step_data,
                    "--output_dir", out, "--pipeline_parallel_degree", "2"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not os.path.exists(out)


# ------------------------------------------------------------------ pretraining (run_pretrain.py) with tensor parallel
PRETRAIN_FAMILIES = ["llama", "gpt-3"]
# Three steps of 4 samples x 16 tokens, no warm-up, cosine decay, a final evaluation on 8 fixed samples. Adam with
# eps=1 (as STEPS): with the default 1e-8, float rounding of a tiny second moment grows into 1e-5 weight differences.
PRETRAIN_STEPS = ["--split", "90,10,0", "--max_seq_length", "16", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                  "--learning_rate", "0.05", "--min_learning_rate", "0.005", "--adam_epsilon", "1.0", "--warmup_steps", "0", "--max_steps", "3",
                  "--logging_steps", "1", "--evaluation_strategy", "no", "--do_eval", "true", "--eval_samples", "8",
                  "--save_strategy", "no", "--seed", "7", "--disable_tqdm", "true"]


def pretrain(*argv):
    from paddlellm.commands.pretrain import run

    assert run(list(argv)) == 0


@pytest.fixture(scope="module")
def pretrain_tp_runs(tiny_dir, tmp_path_factory):
    """Per family: (model, data prefix, one-process continued run, TP=2 continued run, TP=2 run from scratch).

    The TP runs share one launch. Continued training starts both runs from the same weights; from scratch each
    rank draws its own shards, so that run is checked through its merged shards (test below)."""
    from test_pretrain import corpus_texts

    from paddlellm.commands.prepare_pretrain import main as prepare

    root = tmp_path_factory.mktemp("pretrain_tp")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(80)), encoding="utf-8")
    runs, launched = {}, []
    for family in PRETRAIN_FAMILIES:
        model = tp_ready_model(tiny_dir, family, root)
        data = str(root / f"{family}_data" / "corpus")
        assert prepare(["--model_name_or_path", model, "--input_path", str(src), "--output_prefix", data, "--append_eos"]) == 0
        common = ["--model_name_or_path", model, "--input_dir", data, *PRETRAIN_STEPS]
        one, two, fresh = (str(root / f"{family}_{name}") for name in ("continued_1", "continued_tp2", "scratch_tp2"))
        pretrain(*common, "--continue_training", "true", "--output_dir", one)
        launched += [[*common, "--continue_training", "true", "--output_dir", two, "--tensor_parallel_degree", "2"],
                     [*common, "--output_dir", fresh, "--tensor_parallel_degree", "2"]]
        runs[family] = (model, data, one, two, fresh)
    plan = root / "runs.json"
    plan.write_text(json.dumps(launched))
    logs = str(root / "logs")
    proc = run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
                    os.path.join(ROOT, "tests", "parallel_runs.py"), str(plan), "pretrain"], check=False, timeout=600)
    texts = [open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(logs, "workerlog.*")))]
    assert proc.returncode == 0, "\n".join(t[-4000:] for t in texts) + proc.stderr[-2000:]
    assert "CPU tensor parallel: c_identity, mp_allreduce, c_concat, c_split, c_softmax_with_cross_entropy" in texts[0]
    assert "tensor_parallel_degree        : 2" in texts[0]
    return runs


def merged_here(tp_folder):
    """A pretraining run's shards merged: a whole model from 2 tensor-parallel shards."""
    return merged(tp_folder, expect=("model", 2))


def assert_tp_shards(folder):
    assert {"model_state.tp00.pdparams", "model_state.tp01.pdparams"} <= set(os.listdir(folder))  # the Trainer's per-rank shards


@pytest.mark.parametrize("family", PRETRAIN_FAMILIES)
def test_pretraining_tensor_parallel_matches_one_process(pretrain_tp_runs, family):
    model, _, one, two, _ = pretrain_tp_runs[family]
    assert_tp_shards(two)
    expected = losses(one)
    assert len(expected) == 3
    assert losses(two) == pytest.approx(expected, rel=1e-5)
    assert eval_loss(two) == pytest.approx(eval_loss(one), rel=1e-5)
    assert_merged_equals(weights(merged_here(two)), weights(one), weights(model), family)


@pytest.mark.parametrize("family", PRETRAIN_FAMILIES)
def test_pretraining_from_scratch_tensor_parallel_shards_merge(pretrain_tp_runs, family, tmp_path):
    """Fresh shards can't equal one process's draw; merged, they are the model the TP run evaluated: one process
    continuing from the merged folder with learning rate 0 reports the TP run's final eval_loss."""
    model, data, _, _, fresh = pretrain_tp_runs[family]
    assert_tp_shards(fresh)
    rows = losses(fresh)
    with open(os.path.join(merged_here(fresh), "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    assert vocab == 640  # padded to a multiple of 128 (then split in two), as one process pads it
    assert len(rows) == 3 and rows[0] > 0.75 * np.log(vocab)  # a fresh model starts near ln(V)
    check = str(tmp_path / "check")
    pretrain("--model_name_or_path", merged_here(fresh), "--input_dir", data, *PRETRAIN_STEPS, "--continue_training", "true",
             "--learning_rate", "0", "--min_learning_rate", "0", "--max_steps", "1", "--output_dir", check)
    assert eval_loss(check) == pytest.approx(eval_loss(fresh), rel=1e-5)
    ref, got = weights(merged_here(fresh)), weights(check)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)  # learning rate 0: nothing moved
    start = weights(model)  # and the fresh model is not the tiny model's weights
    assert max(float(np.abs(ref[k] - start[k]).max()) for k in ref if ref[k].shape == start[k].shape) > 1e-2
