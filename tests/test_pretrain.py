"""run_pretrain.py on tiny models: every family learns, losses are cross-entropy on labels shifted once,
ChatGLM v1 / GLM stay causal, runs are reproducible, resume is exact and refused when the data order would
change, data parallel and two "nodes" equal one process, errors are one line."""
import glob
import json
import math
import os
import socket
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd
from paddlellm.families import get_family

os.environ["PADDLELLM_NO_PROGRESS"] = "1"

NAMES = ["tom", "ann", "bob", "eve", "max", "sue"]
THINGS = ["cats", "dogs", "apples", "books", "cups"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def corpus_texts(n=200, seed=0):
    """Small documents with a learnable structure (counting down, spelling digits)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        who, what, k = NAMES[rng.integers(6)], THINGS[rng.integers(5)], int(rng.integers(2, 10))
        out.append(f"{who} has {k} {what}. {who} gives one away. now {who} has {k - 1} {what}. spell {k}: {WORDS[k]}.")
    return out


@pytest.fixture(scope="module")
def data_of(tiny_dir, tmp_path_factory):
    """data_of(family) -> a data prefix of the generated corpus made with that family's tokenizer."""
    from paddlellm.commands.prepare_pretrain import main

    root = tmp_path_factory.mktemp("pretrain_data")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()), encoding="utf-8")
    made = {}

    def get(family):
        if family not in made:
            prefix = str(root / family / "corpus")
            assert main(["--model_name_or_path", tiny_dir(family), "--input_path", str(src), "--output_prefix", prefix, "--append_eos"]) == 0
            made[family] = prefix
        return made[family]

    return get


BASE = ["--split", "90,10,0", "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--min_learning_rate", "3e-4", "--warmup_steps", "5", "--max_steps", "60", "--eval_steps", "30",
        "--save_steps", "30", "--logging_steps", "10", "--eval_samples", "32", "--seed", "42", "--disable_tqdm", "true"]


def pretrain(model, data, out, *extra):
    from paddlellm.commands.pretrain import run

    return run(["--model_name_or_path", model, "--input_dir", data, "--output_dir", str(out), *BASE, *extra])


def history(out):
    with open(os.path.join(out, "log_history.json")) as f:
        return json.load(f)


def weights(folder):
    """The weights of a pretraining output folder (model.safetensors) or of a checkpoint (the Trainer's format)."""
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.numpy import load_file

        return load_file(path)
    import paddle

    return {k: v.numpy() for k, v in paddle.load(os.path.join(folder, "model_state.pdparams")).items()}


# MKL picks alignment-dependent code paths, so the same sums over tensors at other addresses (a resumed
# run's freshly loaded weights) can round differently in the last bit, and a few Adam steps can grow that
# to ~4e-6 where a weight's second moment is tiny (seen in a full suite run: 2 of 8192 elements). Run alone
# the runs are bitwise equal. An off-by-one sample or a replayed batch moves weights by 1e-3 and more.
SAME = 1e-5


def assert_weights(got, expected, atol=SAME):
    """Equal weights within atol (default: float rounding noise, see SAME)."""
    assert got.keys() == expected.keys()
    for k in expected:
        if atol is None:
            assert np.array_equal(got[k], expected[k]), k
        else:
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretraining_from_scratch_learns(family, tiny_dir, data_of, tmp_path):
    out = tmp_path / "out"
    assert pretrain(tiny_dir(family), data_of(family), out) == 0
    rows = history(out)
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    vocab = json.load(open(out / "config.json"))
    vocab = vocab.get("vocab_size") or vocab.get("padded_vocab_size")
    assert vocab % 128 == 0  # PaddleNLP's from-scratch rounding of the embedding
    # the first 10 steps average starts near ln(V) (a fresh model) and the end is a fraction of it
    assert train[0] > 0.75 * math.log(vocab) and evals[-1] < 0.45 * math.log(vocab), (train, evals)
    assert train[-1] < 0.5 * train[0]
    assert set(os.listdir(out)) >= {"model.safetensors", "config.json", "paddlellm_meta.json", "train_results.json", "eval_results.json",
                                    "log_history.json", "pretrain_data_settings.json"}
    meta = json.load(open(out / "paddlellm_meta.json"))
    assert (meta["family"], meta["kind"], meta["pretrain"]["objective"]) == (family, "full", get_family(family).pretrain_objectives[0])
    result = json.load(open(out / "eval_results.json"))
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]))
    # the same 32 samples of 32 tokens every time; gmask supervises only the span of each
    assert result["eval_tokens"] == 32 * 32 if meta["pretrain"]["objective"] == "causal" else 0 < result["eval_tokens"] < 32 * 32
    assert json.load(open(out / "train_results.json"))["train_tokens_per_second"] > 0


def _model_and_batch(family_name, tiny, objective):
    import paddle

    family = get_family(family_name)
    tok = family.load_tokenizer(tiny)
    model = family.load_model(tiny)
    model.eval()
    rng = np.random.default_rng(1)
    tokens = rng.integers(10, 500, [2, 17]).astype("int64")
    rngs = [np.random.default_rng([0, i]) for i in range(2)]
    inputs = family.pretrain_inputs(tok, tokens, objective, rngs)
    return model, tokens, {k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in inputs.items()}, family, tok


OBJECTIVES = [(f, o) for f in FAMILIES for o in get_family(f).pretrain_objectives]


@pytest.mark.parametrize("family,objective", OBJECTIVES)
def test_loss_is_cross_entropy_on_labels_shifted_once(family, objective, tiny_dir):
    import paddle
    import paddle.nn.functional as F

    model, tokens, batch, _, _ = _model_and_batch(family, tiny_dir(family), objective)
    labels = batch["labels"].numpy()
    if objective == "causal":
        assert np.array_equal(batch["input_ids"].numpy(), tokens[:, :-1]) and np.array_equal(labels, tokens[:, 1:])
    else:  # context unsupervised; the span is a run of the sample's text, each label the next input token
        ids = batch["input_ids"].numpy()
        for b in range(2):
            span = labels[b][labels[b] != -100].tolist()
            start = len(labels[b]) - len(span)
            assert (labels[b][:start] == -100).all() and 2 <= len(span) < 16
            assert ids[b][start + 1 :].tolist() == span[:-1]
            assert any(tokens[b][j : j + len(span)].tolist() == span for j in range(17))
    with paddle.no_grad():
        out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out[0]
    logits = out.logits if hasattr(out, "logits") else out[1]
    mask = labels != -100
    ce = F.cross_entropy(logits.astype("float32"), paddle.to_tensor(np.where(mask, labels, 0))[..., None], reduction="none").numpy()[..., 0]
    expected = float((ce * mask).sum() / mask.sum())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family,objective", [(f, o) for f, o in OBJECTIVES if get_family(f).prefix_lm])
def test_chatglm_and_glm_never_see_the_future(family, objective, tiny_dir):
    """Changing the last token (always in the causal part) leaves every earlier logit unchanged."""
    import paddle

    model, tokens, batch, fam, tok = _model_and_batch(family, tiny_dir(family), objective)
    changed = dict(batch)
    ids = batch["input_ids"].numpy().copy()
    ids[:, -1] = (ids[:, -1] + 7) % 500 + 10
    changed["input_ids"] = paddle.to_tensor(ids)
    with paddle.no_grad():
        a = model(**batch)
        b = model(**changed)
    la = (a.logits if hasattr(a, "logits") else a[1]).numpy()
    lb = (b.logits if hasattr(b, "logits") else b[1]).numpy()
    assert np.abs(la[:, :-1] - lb[:, :-1]).max() == 0.0
    assert np.abs(la[:, -1] - lb[:, -1]).max() > 1e-4  # the change itself is seen


RESUME = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def straight_run(tiny_dir, data_of, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert pretrain(tiny_dir("llama"), data_of("llama"), out, *RESUME) == 0
    return out


def test_two_identical_runs_give_identical_weights(tiny_dir, data_of, straight_run, tmp_path):
    assert pretrain(tiny_dir("llama"), data_of("llama"), tmp_path / "again", *RESUME) == 0
    assert_weights(weights(tmp_path / "again"), weights(straight_run))
    losses = lambda out: [r["loss"] for r in history(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "again") == losses(straight_run)


KILL_AT_STEP_6 = """
import os, sys
sys.path.insert(0, {root!r})
from paddlellm import trainer
real = trainer.SFTTrainer.training_step
def step(self, *args, **kwargs):
    if self.state.global_step >= 6:
        os._exit(9)  # a hard kill: no exception handler, no cleanup, checkpoint-4 is on disk
    return real(self, *args, **kwargs)
trainer.SFTTrainer.training_step = step
from paddlellm.commands.pretrain import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def killed_run(tiny_dir, data_of, tmp_path_factory):
    out = tmp_path_factory.mktemp("killed") / "out"
    argv = ["--model_name_or_path", tiny_dir("llama"), "--input_dir", data_of("llama"), "--output_dir", str(out), *BASE, *RESUME]
    proc = run_cmd([sys.executable, "-c", KILL_AT_STEP_6.format(root=ROOT), *argv], check=False)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-4"]
    return out


@pytest.mark.parametrize("change,message", [
    (["--seed", "7"], "seed changed from 42 to 7"),
    (["--max_seq_length", "24"], "max_seq_length changed from 32 to 24"),
    (["--per_device_train_batch_size", "2"], "global_batch_size changed from 4 to 2"),
])
def test_resume_with_other_data_settings_is_refused(change, message, tiny_dir, data_of, killed_run, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain(tiny_dir("llama"), data_of("llama"), killed_run, *RESUME, *change)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: can't resume from {killed_run / 'checkpoint-4'}: {message}, which changes the sample order")
    assert sorted(d for d in os.listdir(killed_run) if d.startswith("checkpoint-")) == ["checkpoint-4"]  # kept


def test_killed_run_resumes_to_the_uninterrupted_weights(tiny_dir, data_of, straight_run, killed_run, monkeypatch):
    from paddlellm.commands.pretrain import PretrainCollator

    seen = []
    real = PretrainCollator.__call__

    def record(self, samples):
        if len(samples) == 4:  # training batches (evaluation reads 8 at a time)
            seen.append([s["index"] for s in samples])
        return real(self, samples)

    monkeypatch.setattr(PretrainCollator, "__call__", record)
    assert pretrain(tiny_dir("llama"), data_of("llama"), killed_run, *RESUME) == 0
    # steps 5-8 read samples 16-31 first: a jump to the next unseen sample, no replay (the loader may read ahead)
    assert seen[:4] == [list(range(i, i + 4)) for i in range(16, 32, 4)]
    assert_weights(weights(killed_run), weights(straight_run))
    ev = lambda out: [r["eval_loss"] for r in history(out) if "eval_loss" in r][-1]  # noqa: E731
    assert ev(killed_run) == pytest.approx(ev(straight_run), rel=1e-6)  # float rounding: see assert_weights


def test_continue_training_starts_from_the_weights(tiny_dir, data_of, straight_run, tmp_path):
    out = tmp_path / "out"
    # learning rate 0: one step leaves the weights exactly as loaded
    assert pretrain(str(straight_run), data_of("llama"), out, "--continue_training", "true", "--max_steps", "1",
                    "--learning_rate", "0", "--min_learning_rate", "0", "--warmup_steps", "0", "--per_device_eval_batch_size", "3") == 0
    assert_weights(weights(out), weights(straight_run))
    # the same fixed validation samples, read 3 at a time instead of 8: the same eval_loss
    final = [r for r in history(straight_run) if "eval_loss" in r][-1]
    assert json.load(open(out / "eval_results.json"))["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    fresh = tmp_path / "fresh"
    assert pretrain(str(straight_run), data_of("llama"), fresh, "--max_steps", "1", "--learning_rate", "0", "--min_learning_rate", "0",
                    "--warmup_steps", "0", "--do_eval", "false") == 0
    assert not np.array_equal(weights(fresh)["llama.embed_tokens.weight"], weights(straight_run)["llama.embed_tokens.weight"])


def test_output_folder_loads_in_predict_and_finetune(tiny_dir, data_of, straight_run, tmp_path):
    from paddlellm.commands.finetune import run as finetune
    from paddlellm.loading import load_for_inference
    from paddlellm.commands.predict import main as predict

    model, tok, fam, meta = load_for_inference(str(straight_run))  # what flask_server.py does
    assert fam.name == "llama" and meta["kind"] == "full"
    src = tmp_path / "in.json"
    src.write_text('{"src": "tom has 5 cats.", "tgt": "x"}\n')
    assert predict(["--model_name_or_path", str(straight_run), "--data_file", str(src), "--output_file", str(tmp_path / "o.json"),
                    "--tgt_length", "4", "--batch_size", "1"]) == 0
    assert json.loads(open(tmp_path / "o.json").readline())["src"] == "tom has 5 cats."
    data = tmp_path / "sft"
    data.mkdir()
    for name in ("train.json", "dev.json"):
        (data / name).write_text('{"src": "spell 3", "tgt": "three"}\n')
    assert finetune(["--model_name_or_path", str(straight_run), "--dataset_name_or_path", str(data), "--output_dir", str(tmp_path / "ft"),
                     "--max_steps", "1", "--src_length", "8", "--tgt_length", "4", "--disable_tqdm", "true"]) == 0


def _error(capsys, *argv):
    from paddlellm.commands.pretrain import run

    with pytest.raises(SystemExit) as e:
        run(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_refusals_are_one_line(tiny_dir, data_of, tmp_path, capsys):
    from paddlellm.pretrain_data import write_mmap

    llama, out = tiny_dir("llama"), str(tmp_path / "out")
    common = ["--model_name_or_path", llama, "--output_dir", out, "--max_steps", "2", "--max_seq_length", "16"]
    assert _error(capsys, *common, "--input_dir", data_of("glm")).startswith(
        f"error: {data_of('glm')}: made with another tokenizer (tokenizer_class 'GLMChineseTokenizer' in {data_of('glm')}.json, the model's is 'LlamaTokenizer'")
    small = str(tmp_path / "small")
    write_mmap(small, [[5, 6, 7, 8, 2]] * 10)
    assert _error(capsys, *common, "--input_dir", small) == (
        f"error: {small}: --split 949,50,1 leaves the validation split no document (train/valid/test = 10/0/0 of 10 documents); "
        "use more documents, give it a larger share or turn evaluation off (--do_eval false)")
    write_mmap(str(tmp_path / "big"), [[700, 2]])  # a PaddleNLP file without our sidecar: ids checked against the vocabulary
    assert _error(capsys, *common, "--input_dir", str(tmp_path / "big"), "--split", "1,0,0", "--do_eval", "false") == (
        f"error: {tmp_path / 'big'}: token id 700 is outside the model's vocabulary of 600: the data was made with another tokenizer")
    data = data_of("llama")
    assert _error(capsys, *common, "--input_dir", data, "--objective", "gmask") == "error: --objective gmask: the llama family pretrains with causal"
    (tmp_path / "empty").mkdir()
    assert _error(capsys, *common, "--input_dir", str(tmp_path / "empty")).startswith(f"error: input_dir {str(tmp_path / 'empty')!r}: no PaddleNLP data files in it")
    assert _error(capsys, *common, "--input_dir", data, "--use_flash_attention", "true") == (
        "error: --use_flash_attention: needs a GPU (paddlepaddle-gpu); set it to false to train on CPU")
    assert _error(capsys, *common, "--input_dir", data, "--bf16", "true") == "error: --bf16: mixed precision needs a GPU here; pass --bf16 false to train in float32 on CPU"
    assert _error(capsys, *common, "--input_dir", data, "--tensor_parallel_degree", "2") == (  # runs under the launcher: tests/test_parallel.py
        "error: --tensor_parallel_degree 2: the model is split over 2 processes but this run has 1; start it with "
        "python -m paddle.distributed.launch --nproc_per_node 2 run_pretrain.py ...")
    assert _error(capsys, *common[:-4], "--input_dir", data) == (
        "error: max_steps is required (pretraining counts steps; the samples it needs are drawn from the corpus)")
    assert not os.path.exists(out)  # nothing left behind


def test_waiting_for_the_index_has_a_limit(tiny_dir, data_of, tmp_path, capsys, monkeypatch):
    """A process that does not build the index (not rank 0 of its node) gives up after data_index_timeout."""
    from paddlenlp.data import causal_dataset

    monkeypatch.setattr(causal_dataset, "local_rank", 1)
    cache = tmp_path / "cache"
    err = _error(capsys, "--model_name_or_path", tiny_dir("llama"), "--output_dir", str(tmp_path / "out"), "--input_dir", data_of("llama"),
                 "--max_steps", "3", "--max_seq_length", "16", "--data_cache", str(cache), "--data_index_timeout", "1", "--seed", "5")
    assert err.startswith("error: waited 1 s for another process to build the sample index in")


LAUNCH = ["--split", "90,10,0", "--max_seq_length", "32", "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3",
          "--min_learning_rate", "3e-4", "--warmup_steps", "1", "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
          "--logging_steps", "1", "--eval_samples", "16", "--seed", "42", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def one_process_batch_8(tiny_dir, data_of, tmp_path_factory):
    from paddlellm.commands.pretrain import run

    out = tmp_path_factory.mktemp("one") / "out"
    assert run(["--model_name_or_path", tiny_dir("llama"), "--input_dir", data_of("llama"), "--output_dir", str(out),
                "--per_device_train_batch_size", "8", *LAUNCH]) == 0
    return out


def _launch(tiny_dir, data_of, out, logs, *launcher):
    return [sys.executable, "-m", "paddle.distributed.launch", *launcher, "--log_dir", str(logs), os.path.join(ROOT, "run_pretrain.py"),
            "--model_name_or_path", tiny_dir("llama"), "--input_dir", data_of("llama"), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", *LAUNCH]


def _check_like_one_process(out, logs, reference):
    texts = [open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(logs, "**", "workerlog.*"), recursive=True))]
    assert len(texts) == 2 and all("data_parallel_degree          : 2" in t for t in texts), "\n".join(t[-3000:] for t in texts)
    # Only the float summation order differs (gradients averaged over 2 processes instead of one batch of 8);
    # Adam's normalised steps turn that into weight differences of a few 1e-6 (weights ~1e-2, lr 3e-3).
    assert_weights(weights(out), weights(reference), atol=2e-5)
    ev = lambda o: json.load(open(os.path.join(o, "eval_results.json")))  # noqa: E731
    assert ev(out)["eval_loss"] == pytest.approx(ev(reference)["eval_loss"], abs=1e-6) and ev(out)["eval_tokens"] == 16 * 32


def test_two_processes_batch_4_equal_one_process_batch_8(tiny_dir, data_of, one_process_batch_8, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = run_cmd(_launch(tiny_dir, data_of, out, logs, "--nproc_per_node", "2"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + "".join(open(p).read()[-2000:] for p in glob.glob(str(logs / "workerlog.*")))
    _check_like_one_process(out, logs, one_process_batch_8)


def test_two_nodes_over_loopback_equal_one_process(tiny_dir, data_of, one_process_batch_8, tmp_path):
    """Two launcher invocations (one "node" each, one process each) meeting at --master 127.0.0.1:PORT."""
    import subprocess

    from conftest import BASE_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    # share_folder: both "nodes" see the same data folder, so only global rank 0 builds the index
    nodes = [subprocess.Popen(_launch(tiny_dir, data_of, out, tmp_path / f"node{i}", "--master", f"127.0.0.1:{port}", "--nnodes", "2",
                                      "--nproc_per_node", "1") + ["--share_folder", "true"],
                              cwd=ROOT, env=BASE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], "".join(open(p).read()[-2000:] for p in glob.glob(str(tmp_path / "node*" / "workerlog.*")))
    _check_like_one_process(out, tmp_path, one_process_batch_8)


PRETRAIN_FILES = sorted(glob.glob(os.path.join(ROOT, "llm", "*", "pretrain_argument.json")))


def test_every_family_ships_a_pretrain_argument_file():
    from paddlellm.families import names

    assert PRETRAIN_FILES == sorted(os.path.join(ROOT, "llm", f, "pretrain_argument.json") for f in names())


@pytest.mark.parametrize("path", PRETRAIN_FILES, ids=[os.path.relpath(p, ROOT) for p in PRETRAIN_FILES])
def test_shipped_pretrain_files_parse(path):
    from paddlellm.families import find_by_name
    from paddlellm.commands.pretrain import parse

    model_args, data_args, extra, training = parse([path])
    assert find_by_name(model_args.model_name_or_path).name == os.path.basename(os.path.dirname(path))
    assert data_args.input_dir and training["max_steps"] > 0 and extra.min_learning_rate < training["learning_rate"]


# A PaddleNLP 2023 pretraining file (llm/llama/pretrain-llama2_13b-tp4pp2sd4_stage1.json), flags written as 0/1.
PADDLENLP_FILE = {
    "model_name_or_path": "meta-llama/Llama-2-13b", "tokenizer_name_or_path": "meta-llama/Llama-2-13b", "input_dir": "./data",
    "output_dir": "./checkpoints/llama2_pretrain_ckpts", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 256,
    "per_device_eval_batch_size": 64, "tensor_parallel_degree": 4, "pipeline_parallel_degree": 2,
    "pipeline_parallel_config": "disable_partial_send_recv", "sharding_parallel_degree": -1, "sharding": "stage1", "virtual_pp_degree": 1,
    "sequence_parallel": 1, "adam_beta1": 0.9, "adam_beta2": 0.95, "use_flash_attention": True, "use_fused_rms_norm": True,
    "use_fused_rope": False, "max_seq_length": 2048, "learning_rate": 1e-04, "min_learning_rate": 1e-05, "warmup_steps": 2000,
    "logging_steps": 1, "max_steps": 200000, "save_steps": 200, "eval_steps": 2000, "weight_decay": 0.1, "bf16": False, "fp16": True,
    "fp16_opt_level": "O2", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "amp_master_grad": 1, "dataloader_num_workers": 1,
    "continue_training": 1, "do_train": True, "do_eval": True, "do_predict": True, "disable_tqdm": True, "recompute": False,
    "distributed_dataloader": 0, "recompute_granularity": "full", "save_total_limit": 2, "model_type": "llama",
}


def test_paddlenlp_pretrain_file_parses_and_gpu_settings_are_refused_in_one_line(tmp_path, capsys):
    from paddlellm.commands.pretrain import parse

    path = tmp_path / "pretrain-llama2_13b.json"
    path.write_text(json.dumps(PADDLENLP_FILE))
    model_args, data_args, _, training = parse([str(path), "--pipeline_parallel_degree", "1", "--output_dir", str(tmp_path / "o")])
    assert model_args.continue_training is True and model_args.sequence_parallel is True and data_args.max_seq_length == 2048
    assert training["amp_master_grad"] is True and training["distributed_dataloader"] is False
    with pytest.raises(SystemExit):
        parse([str(path), "--output_dir", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == "error: pipeline parallel is not supported; use data parallel or tensor parallel"


def test_blend_of_two_prefixes_and_folder_of_prefixes(tiny_dir, data_of, tmp_path):
    import shutil

    from paddlellm.pretrain_data import resolve_input_dir

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        for ext in (".bin", ".idx", ".json"):
            shutil.copy(data_of("llama") + ext, folder / f"{name}{ext}")
    a, b = str(folder / "a"), str(folder / "b")
    assert resolve_input_dir(str(folder)) == [(1.0, a), (1.0, b)]
    assert resolve_input_dir(f"1 {a} 3 {b}.bin") == [(1.0, a), (3.0, b)]
    out = tmp_path / "out"
    assert pretrain(tiny_dir("llama"), f"1 {a} 3 {b}", out, "--max_steps", "3", "--eval_steps", "3") == 0
    assert json.load(open(out / "pretrain_data_settings.json"))["input"] == [[1.0, a], [3.0, b]]


def test_help_is_fast_and_lists_the_arguments():
    code = ("import atexit, contextlib, sys\n"
            "atexit.register(lambda: print('PADDLE_LOADED' if 'paddle' in sys.modules else 'PADDLE_NOT_LOADED'))\n"
            "from paddlellm.cli import main\n"
            "for command in ('pretrain', 'prepare-pretrain'):\n"
            "    with contextlib.suppress(SystemExit):\n"
            "        main([command, '--help'])\n")
    out = run_cmd([sys.executable, "-c", code]).stdout
    for name in ("--input_dir", "--continue_training", "--objective", "--min_learning_rate", "--eval_samples", "--max_steps",
                 "--output_prefix", "--append_eos", "--json_key", "--workers"):
        assert name in out
    assert out.strip().endswith("PADDLE_NOT_LOADED")


def test_read_only_data_folder_keeps_the_index_in_output_dir(tiny_dir, data_of, tmp_path, monkeypatch):
    import paddlellm.commands.pretrain as pretrain_module

    data_dir = os.path.dirname(data_of("llama"))
    real_access = os.access
    # as root every folder is writable: make the data folder look read-only to the writability check
    monkeypatch.setattr(pretrain_module.os, "access", lambda p, mode: False if os.path.abspath(p) == data_dir else real_access(p, mode))
    out = tmp_path / "out"
    before = set(glob.glob(os.path.join(data_dir, "index-cache", "*")))
    assert pretrain(tiny_dir("llama"), data_of("llama"), out, "--max_steps", "2", "--do_eval", "false", "--seed", "11") == 0
    assert glob.glob(str(out / "index-cache" / "*_shuffle_idx.npy"))
    assert not (out / "eval_results.json").exists()  # --do_eval false means no evaluation
    assert set(glob.glob(os.path.join(data_dir, "index-cache", "*"))) == before  # nothing written next to the data
