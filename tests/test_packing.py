"""InTokens packing is exact, and the loss does not depend on how a step's examples are batched."""
import json
import math
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ONE_STEP, ROOT, run_cmd
from paddlellm.data import DataError, pack_examples
from paddlellm.families import Example, get_family, logits_of


def ex(n):
    return Example(list(range(n)), [1] * n, list(range(n)))


def test_best_fit_decreasing_packs_tightly():
    lengths = [5, 3, 8, 2, 6, 4, 2]
    rows, eff = pack_examples([ex(n) for n in lengths], 10)
    assert [[len(e) for e in r] for r in rows] == [[8, 2], [6, 4], [5, 3, 2]]
    assert eff == pytest.approx(30 / 30)
    rows, eff = pack_examples([ex(n) for n in (7, 7, 7)], 10)
    assert len(rows) == 3 and eff == pytest.approx(21 / 30)


def test_example_longer_than_a_row_is_an_error():
    with pytest.raises(DataError, match="intokens_max_length=4 is shorter than an example of 6 tokens"):
        pack_examples([ex(3), ex(6)], 4)


EXAMPLES = [(["spell: 1 2 3"], ["one two three"]), (["hello", "spell: 4"], ["hi there", "four"]), (["spell: 5 6"], ["five six"])]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_loss_equal_separate(family, tiny_dir):
    import paddle

    fam = get_family(family)
    if not fam.supports.get("intokens"):
        pytest.skip(f"{family}: packing unsupported (README says so)")
    path = tiny_dir(family)
    tok = fam.load_tokenizer(path)
    model = fam.load_model(path)
    model.eval()
    exs = [fam.encode(tok, s, t, 64, 32) for s, t in EXAMPLES]

    def run(rows):
        batch = {k: paddle.to_tensor(v) for k, v in fam.build_batch(rows, tok.pad_token_id).items()}
        labels = batch.pop("labels")
        with paddle.no_grad():
            out = model(**batch)
        logits = logits_of(out).astype("float32")
        ce = paddle.nn.functional.cross_entropy(logits, labels.unsqueeze(-1), ignore_index=-100, reduction="none")
        return logits.numpy(), ce.numpy()[..., 0], labels.numpy()

    packed_logits, packed_ce, _ = run([exs])
    off = 0
    total_sep = 0.0
    for e in exs:
        logits, ce, labels = run([[e]])
        n = len(e)
        np.testing.assert_allclose(packed_logits[0, off:off + n], logits[0, :n], atol=1e-5, rtol=1e-5)
        total_sep += float(ce[0, :n][labels[0, :n] != -100].sum())
        off += n
    packed_total = float(packed_ce[0][packed_ce[0] != 0].sum())
    assert packed_total == pytest.approx(total_sep, rel=1e-5)


def _weights(out):
    from safetensors.numpy import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def _first_loss(out):
    with open(os.path.join(out, "log_history.json")) as f:
        return next(r["loss"] for r in json.load(f) if "loss" in r)


def _manual_loss(model_dir, data_dir):
    """Mean cross-entropy over every supervised token of the 4 examples, one example at a time."""
    import paddle

    fam = get_family("llama")
    tok, examples = _step_examples(model_dir, data_dir)
    model = fam.load_model(model_dir)
    model.eval()
    total, count = 0.0, 0
    for e in examples:
        batch = {k: paddle.to_tensor(v) for k, v in fam.build_batch([[e]], tok.pad_token_id).items()}
        labels = batch.pop("labels")
        with paddle.no_grad():
            out = model(**batch)
        logits = logits_of(out).astype("float32")
        total += float(paddle.nn.functional.cross_entropy(logits, labels.unsqueeze(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).astype("int64").sum())
    return total / count


def test_one_step_is_the_same_for_any_batching(tiny_dir, step_data, tmp_path):
    from paddlellm.commands import finetune as ft

    model = tiny_dir("llama")
    variants = {
        "batch4": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"],
        "batch1_accum4": ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"],
        "packed": ["--per_device_train_batch_size", "4", "--intokens", "true", "--intokens_max_length", "48"],
    }
    results = {}
    for name, extra in variants.items():
        out = str(tmp_path / name)
        assert ft.run(["--model_name_or_path", model, "--dataset_name_or_path", step_data, "--output_dir", out, *ONE_STEP, *extra]) == 0
        results[name] = (_first_loss(out), _weights(out))
    # two processes, 2 examples each
    out = str(tmp_path / "dp2")
    run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
             os.path.join(ROOT, "finetune_generation.py"), "--model_name_or_path", model, "--dataset_name_or_path", step_data,
             "--output_dir", out, *ONE_STEP, "--per_device_train_batch_size", "2"], timeout=600)
    results["dp2"] = (_first_loss(out), _weights(out))

    expected = _manual_loss(model, step_data)
    ref_loss, ref_w = results["batch4"]
    assert ref_loss == pytest.approx(expected, rel=1e-5)
    for name, (loss, w) in results.items():
        assert loss == pytest.approx(expected, rel=1e-5), name
        for k in ref_w:
            np.testing.assert_allclose(w[k], ref_w[k], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k}")
    base = _weights_of(model)
    moved = max(float(np.abs(ref_w[k] - base[k]).max()) for k in ref_w)
    assert moved > 1e-3  # the step really changed the weights


PACKED_METHODS = {"sft": ([], "model.safetensors"),
                  "prefix": (["--prefix_tuning", "true", "--num_prefix_tokens", "4"], "prefix_model_state.pdparams")}


@pytest.mark.parametrize("method", list(PACKED_METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_unpacked_step(family, method, tiny_dir, step_data, tmp_path, capsys):
    """Gradients through the packed path are exact too: one packed step updates every trained weight (the
    model's, or the prefix's with the prefix attended by every packed example) as an unpacked one."""
    from paddlenlp.transformers.model_utils import load_state_dict

    from paddlellm.commands import finetune as ft

    extra_args, weights_file = PACKED_METHODS[method]
    common = ["--model_name_or_path", tiny_dir(family), "--dataset_name_or_path", step_data, *ONE_STEP,
              "--per_device_train_batch_size", "4", *extra_args]
    packed = ["--intokens", "true", "--intokens_max_length", "64"]
    if method == "prefix" and not get_family(family).supports.get("intokens_prefix", True):
        out = str(tmp_path / "packed")
        with pytest.raises(SystemExit) as e:
            ft.run(common + ["--output_dir", out, *packed])
        assert e.value.code == 2 and not os.path.exists(out)
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --intokens: prefix tuning of the {family} family can't be packed exactly (see llm/{family}/README.md); "
            "train the prefix with intokens off")
        return
    results = {}
    for name, extra in {"batch4": [], "packed": packed}.items():
        out = str(tmp_path / name)
        assert ft.run(common + ["--output_dir", out, *extra]) == 0
        results[name] = (_first_loss(out), {k: v.numpy() for k, v in load_state_dict(os.path.join(out, weights_file)).items()})
    (loss, w), (packed_loss, packed_w) = results["batch4"], results["packed"]
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    for k in w:
        np.testing.assert_allclose(packed_w[k], w[k], rtol=1e-4, atol=1e-6, err_msg=k)


def _weights_of(model_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_eval_loss_same_with_and_without_packing(tiny_dir, step_data, tmp_path):
    from paddlellm.commands import finetune as ft

    evals = []
    for extra in ([], ["--intokens", "true", "--intokens_max_length", "48"], ["--per_device_eval_batch_size", "1"]):
        out = str(tmp_path / f"e{len(evals)}")
        assert ft.run(["--model_name_or_path", tiny_dir("llama"), "--dataset_name_or_path", step_data, "--output_dir", out,
                       *ONE_STEP, "--learning_rate", "0", *extra]) == 0
        with open(os.path.join(out, "eval_results.json")) as f:
            evals.append(json.load(f))
    expected = _manual_loss(tiny_dir("llama"), step_data)
    for ev in evals:
        assert ev["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert ev["eval_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_packing_a_family_that_cannot_be_packed_is_one_clear_error(tiny_dir, step_data, tmp_path, capsys, monkeypatch):
    """Every family packs today; a registry entry that says it can't is refused in one line before training."""
    from paddlellm.commands import finetune as ft

    monkeypatch.setitem(get_family("opt").supports, "intokens", False)
    out = str(tmp_path / "opt")
    with pytest.raises(SystemExit) as e:
        ft.run(["--model_name_or_path", tiny_dir("opt"), "--dataset_name_or_path", step_data, "--output_dir", out,
                *ONE_STEP, "--intokens", "true"])
    assert e.value.code == 2 and not os.path.exists(out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --intokens: packing is not supported for the opt family (see the README's support table)")


def test_backward_value_stays_at_mean_loss_scale(tiny_dir, step_data, tmp_path, monkeypatch):
    """What is backpropagated (and what an fp16 loss scaler multiplies) is the token-loss sum over a constant
    budget, never larger than a mean loss: gradients before normalisation are at most the final ones, which
    are then exactly the mean-loss gradients (the one-step tests above check the update itself)."""
    import paddle

    from paddlellm.commands import finetune as ft
    from paddlellm.trainer import SFTTrainer

    norms = []
    real = SFTTrainer.normalise_gradients

    def grad_norm(model):
        return math.sqrt(sum(float((p.grad.astype("float64") ** 2).sum()) for p in model.parameters() if p.grad is not None))

    def spy(self):
        before = grad_norm(self.model)
        real(self)
        norms.append((before, grad_norm(self.model), self.token_budget()))

    monkeypatch.setattr(SFTTrainer, "normalise_gradients", spy)
    assert ft.run(["--model_name_or_path", tiny_dir("llama"), "--dataset_name_or_path", step_data, "--output_dir", str(tmp_path / "o"),
                   *ONE_STEP, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]) == 0
    (before, after, budget), = norms
    assert budget == 2 * 2 * (32 + 16)
    assert 0 < before < after
    tokens = sum(int((np.array(e.labels) != -100).sum()) for e in _step_examples(tiny_dir("llama"), step_data)[1])
    assert before == pytest.approx(after * tokens / budget, rel=1e-4)


def _step_examples(model_dir, data_dir):
    """(tokenizer, the step data's train examples encoded as ONE_STEP's lengths) for the tiny LLaMA."""
    from paddlellm.data import read_split

    fam = get_family("llama")
    tok = fam.load_tokenizer(model_dir)
    return tok, [fam.encode(tok, r.src, r.tgt, 32, 16) for r in read_split(data_dir, "train")]
