"""The CPU kernel patches (paddlellm.cpu_kernels) change the speed, not the results: logits, loss, gradients
and one training step's weights match the unpatched model, unpacked and packed, for every patched family."""
import copy
import json
import logging
import os

import numpy as np
import pytest

from conftest import FAMILIES, ONE_STEP
from paddlellm import cpu_kernels
from paddlellm.families import get_family, logits_of
from test_packing import EXAMPLES

PATCHED = [f for f in FAMILIES if get_family(f).cpu_patches]
# families with a patch of the model's forward pass (ChatGLM v1's only patch is of its generation inputs)
FORWARD_PATCHED = [f for f in PATCHED if set(get_family(f).cpu_patches) - {"chatglm_generation_inputs"}]


def test_every_declared_patch_exists_and_some_family_uses_each():
    declared = {p for f in FAMILIES for p in get_family(f).cpu_patches}
    assert declared <= set(cpu_kernels.PATCHES)
    assert declared == set(cpu_kernels.PATCHES)  # no patch left unused
    assert "llama" in PATCHED


def _models(family, path):
    """(unpatched, patched) copies of the tiny model, same weights."""
    fam = get_family(family)
    plain, patched = fam.load_model(path), fam.load_model(path)
    cpu_kernels.apply(fam, patched, force=True)
    return plain, patched


def _batches(family, path):
    import paddle

    fam = get_family(family)
    tok = fam.load_tokenizer(path)
    exs = [fam.encode(tok, s, t, 64, 32) for s, t in EXAMPLES]
    unpacked = fam.build_batch([[e] for e in exs], tok.pad_token_id)  # padded rows
    packed = fam.build_batch([exs[:2], exs[2:]], tok.pad_token_id)  # block-diagonal masks
    return {name: {k: paddle.to_tensor(v) for k, v in b.items()} for name, b in (("unpacked", unpacked), ("packed", packed))}


@pytest.mark.parametrize("family", PATCHED)
def test_patched_logits_loss_and_gradients_match(family, tiny_dir):
    import paddle

    path = tiny_dir(family)
    plain, patched = _models(family, path)
    # the patches really replaced something: the patched model has instance methods (forward, or ChatGLM v1's
    # prepare_inputs_for_generation) beyond those the family's load_model gives every model (OPT's and ChatGLM v1's
    # load_model already replace the forward: told apart by the function behind the method)
    def overridden(m):
        return {(name, type(layer).__name__, k, getattr(vars(layer)[k], "__func__", vars(layer)[k]).__qualname__)
                for name, layer in m.named_sublayers(include_self=True)
                for k in ("forward", "prepare_inputs_for_generation") if k in vars(layer)}

    assert overridden(patched) - overridden(plain)
    for name, batch in _batches(family, path).items():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        plain.eval(), patched.eval()
        with paddle.no_grad():
            a, b = (logits_of(m(**inputs)).numpy() for m in (plain, patched))
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=f"{family} {name} logits")
        # training forward with labels: same loss and same gradient of every weight
        grads = []
        for m in (plain, patched):
            m.train()
            out = m(**batch)
            loss = out.loss if hasattr(out, "loss") else out[0]
            loss.backward()
            grads.append((float(loss), {n: p.grad.numpy().copy() for n, p in m.named_parameters() if p.grad is not None}))
            m.clear_gradients()
        (loss_a, ga), (loss_b, gb) = grads
        assert loss_b == pytest.approx(loss_a, rel=1e-5), name
        assert ga.keys() == gb.keys() and len(ga) == len(list(plain.parameters()))
        for n in ga:
            np.testing.assert_allclose(gb[n], ga[n], atol=1e-5, rtol=1e-4, err_msg=f"{family} {name} grad {n}")


@pytest.mark.parametrize("family", FORWARD_PATCHED)
def test_a_deepcopy_of_a_patched_model_runs_on_its_own_weights(family, tiny_dir):
    import paddle

    path = tiny_dir(family)
    _, patched = _models(family, path)
    patched.eval()
    clone = copy.deepcopy(patched)
    # every weight of the copy but the output head (the last one; for a head tied to the embeddings, those) zeroed:
    # its logits are 0 only if the whole forward ran on the copy (a patch bound to the original's layers would give
    # the original's)
    vocab, params = clone.config.vocab_size, clone.parameters()
    head = params[-1] if vocab in params[-1].shape else next(p for p in params if vocab in p.shape)
    with paddle.no_grad():
        for p in params:
            if p.name != head.name:
                p.set_value(paddle.zeros_like(p))
    inputs = {k: v for k, v in _batches(family, path)["unpacked"].items() if k != "labels"}
    with paddle.no_grad():
        ours, theirs = logits_of(patched(**inputs)).numpy(), logits_of(clone(**inputs)).numpy()
    assert np.abs(theirs).max() == 0 and np.abs(ours).max() > 0


def _one_step(family, tiny_dir, step_data, out, extra, kernels_on, monkeypatch, caplog):
    import paddle

    from paddlellm.commands import finetune as ft

    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "1" if kernels_on else "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="paddlellm"):
        assert ft.run(["--model_name_or_path", tiny_dir(family), "--dataset_name_or_path", step_data, "--output_dir", out,
                       *ONE_STEP, "--per_device_train_batch_size", "4", *extra]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU kernels on")]
    assert len(said) == (1 if kernels_on else 0), said
    if kernels_on:
        assert said[0].startswith(f"CPU kernels on for {family}: {', '.join(get_family(family).cpu_patches)}")
        assert said[0].endswith("set PADDLELLM_CPU_KERNELS=0 to turn them off")
    with open(os.path.join(out, "log_history.json")) as f:
        loss = next(r["loss"] for r in json.load(f) if "loss" in r)
    if "--lora" in extra:
        return loss, {k: v.numpy() for k, v in paddle.load(os.path.join(out, "lora_model_state.pdparams")).items()}
    from safetensors.numpy import load_file

    return loss, load_file(os.path.join(out, "model.safetensors"))  # a full fine-tune's final weights


@pytest.mark.parametrize("family", PATCHED)
def test_one_training_step_same_weights_with_kernels_on_and_off(family, tiny_dir, step_data, tmp_path, monkeypatch, caplog):
    """Through the real fine-tuning command: SFT and LoRA, and a packed step with the patches on equals an
    unpacked step without them (packing stays exact)."""
    from safetensors.numpy import load_file

    def step(name, extra, on):
        return _one_step(family, tiny_dir, step_data, str(tmp_path / name), extra, on, monkeypatch, caplog)

    lora = ["--lora", "true", "--lora_rank", "4"]
    sft_off = step("sft_off", [], False)
    pairs = {
        "sft": (sft_off, step("sft_on", [], True)),
        "lora": (step("lora_off", lora, False), step("lora_on", lora, True)),
        "packed": (sft_off, step("packed_on", ["--intokens", "true", "--intokens_max_length", "64"], True)),
    }
    for name, ((loss_off, w_off), (loss_on, w_on)) in pairs.items():
        assert loss_on == pytest.approx(loss_off, rel=1e-5), name
        assert w_on.keys() == w_off.keys() and w_on
        for k in w_off:
            np.testing.assert_allclose(w_on[k], w_off[k], atol=1e-5, rtol=0, err_msg=f"{family} {name}: {k}")
    base = load_file(os.path.join(tiny_dir(family), "model.safetensors"))
    w = sft_off[1]
    assert max(float(np.abs(w[k] - base[k]).max()) for k in w if k in base) > 1e-3  # the step moved the weights
    assert max(float(np.abs(v).max()) for k, v in pairs["lora"][0][1].items() if "lora_B" in k) > 1e-3


def test_switched_off_or_gpu_leaves_the_model_alone(tiny_dir, monkeypatch):
    fam = get_family("llama")
    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")
    assert not cpu_kernels.wanted()
    model = cpu_kernels.apply(fam, fam.load_model(tiny_dir("llama")))
    assert not any("forward" in vars(layer) for layer in model.sublayers(include_self=True))
    monkeypatch.delenv(cpu_kernels.DISABLE_VAR)
    assert cpu_kernels.wanted()  # tests run on CPU
    import paddle

    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    assert not cpu_kernels.wanted()


@pytest.mark.parametrize("family", PATCHED)
def test_generation_same_tokens_with_kernels_on_and_off(family, tiny_dir, monkeypatch):
    """Greedy and seeded-sampling replies, through the decode loop and through paddlenlp's generate(), are
    token for token those of the unpatched model run with everything off (PADDLELLM_CPU_KERNELS=0)."""
    import paddle

    from paddlellm.generation import _generation_inputs, generate_batch

    path = tiny_dir(family)
    plain, patched = _models(family, path)
    plain.eval(), patched.eval()
    fam = get_family(family)
    tok = fam.load_tokenizer(path)
    texts = ["hello there", "spell: 1 2 3 4 5 6 and more words here", "x y z"]
    prompts = [fam.generation_prompt(tok, [t], [], 32) for t in texts]
    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, 8).items()}

    def gen(model, own_loop, seed=None, **settings):
        if seed is not None:
            paddle.seed(seed)
        return generate_batch(model, fam, dict(inputs), 8, fam.stop_token_id(tok), tok.pad_token_id, own_loop=own_loop,
                              **settings).numpy()

    sampling = dict(seed=7, top_k=0, top_p=0.9, temperature=0.8)
    for own_loop in (True, False):
        monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")
        before = [gen(plain, own_loop), gen(plain, own_loop, **sampling)]
        monkeypatch.delenv(cpu_kernels.DISABLE_VAR)
        after = [gen(patched, own_loop), gen(patched, own_loop, **sampling)]
        for a, b, what in zip(before, after, ("greedy", "sampling")):
            assert a.shape == (len(texts), 8)
            np.testing.assert_array_equal(b, a, err_msg=f"{family} {what} own_loop={own_loop}")


@pytest.mark.parametrize("family", [f for f in PATCHED if any(p.endswith("_last_logits") for p in get_family(f).cpu_patches)])
def test_last_logits_only_while_generating(family, tiny_dir):
    """Inside generating(), a patched model returns the last position's logits (those of the full forward within
    1e-5) and its cache; outside it, the full [batch, seq, vocab] logits as before."""
    import paddle

    path = tiny_dir(family)
    plain, patched = _models(family, path)
    plain.eval(), patched.eval()
    inputs = {k: v for k, v in _batches(family, path)["unpacked"].items() if k not in ("labels", "loss_mask")}
    with paddle.no_grad():
        full = logits_of(plain(**inputs)).numpy()
        assert logits_of(patched(**inputs)).shape == list(full.shape)
        with cpu_kernels.generating():
            out = patched(**inputs, use_cache=True)
            plain_inside = logits_of(plain(**inputs)).numpy()
            plain_cached = plain(**inputs, use_cache=True)
    last = logits_of(out).numpy()
    assert last.shape == (full.shape[0], 1, full.shape[2])
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(plain_inside, full)  # an unpatched model is untouched by the context

    def cache(o):  # every tensor of the cache the forward returns, in order, whatever its nesting
        c = o[1:] if isinstance(o, tuple) else o.past_key_values
        flat, todo = [], [c]
        while todo:
            x = todo.pop(0)
            if isinstance(x, (list, tuple)):
                todo[:0] = list(x)
            elif x is not None:
                flat.append(x.numpy())
        return flat

    want, got = cache(plain_cached), cache(out)
    layers = getattr(plain.config, (get_family(family).config_keys or {}).get("num_hidden_layers", "num_hidden_layers"))
    assert len(got) == len(want) >= layers
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_dense_views_turns_stride_kernels_off_and_restores_them(monkeypatch):
    import paddle

    flag = cpu_kernels.STRIDE_FLAG
    start = paddle.get_flags([flag])[flag]
    assert start is True  # paddle's default
    with cpu_kernels.dense_views():
        assert paddle.get_flags([flag])[flag] is False
        x = paddle.arange(24, dtype="float32").reshape([2, 3, 4])
        np.testing.assert_array_equal(paddle.matmul(x.transpose([0, 2, 1]), x).numpy(),
                                      np.matmul(x.numpy().transpose(0, 2, 1), x.numpy()))
    assert paddle.get_flags([flag])[flag] is True
    with pytest.raises(ValueError):
        with cpu_kernels.generating():
            raise ValueError("a failing step")
    assert paddle.get_flags([flag])[flag] is True
    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")
    with cpu_kernels.dense_views():
        assert paddle.get_flags([flag])[flag] is True  # switched off: paddle's default kept


def _additive(attend):
    """A bool [B, 1, S, S] may-attend mask as paddlenlp's LLaMA turns it into an additive one (0 / finfo.min)."""
    import paddle

    return paddle.where(paddle.to_tensor(attend), paddle.zeros([1]), paddle.full([1], paddle.finfo(paddle.float32).min))


def test_query_groups_of_packed_padded_and_other_masks(tiny_dir):
    """The mask analysis behind llama_segment_attention: packed rows give one causal block per example and a
    'self' run for the padding, right-padded rows a causal block and a rectangle; anything else gives None."""
    fam = get_family("llama")
    tok = fam.load_tokenizer(tiny_dir("llama"))
    exs = [fam.encode(tok, s, t, 64, 32) for s, t in EXAMPLES]
    n = [len(e) for e in exs]
    packed = fam.build_batch([exs[:2], exs[2:]], tok.pad_token_id)["attention_mask"]
    S = packed.shape[-1]
    groups = cpu_kernels._query_groups(_additive(packed))
    for row, lengths in zip(groups, ([n[0], n[1]], [n[2]])):
        want, at = [], 0
        for k in lengths:
            want.append((at, at + k, at, at + k, "causal"))
            at += k
        if at < S:
            want.append((at, S, at, S, "self"))  # the padding tail: each position attends only itself
        assert row == want
    assert any(g[4] == "self" for row in groups for g in row)

    # a 2-D right-padded mask as LlamaModel expands it (causal & keys of the row): causal block + padding rectangle
    L, used = 9, 6
    causal = np.tril(np.ones([L, L], bool))
    keys = np.arange(L) < used
    assert cpu_kernels._query_groups(_additive((causal & keys)[None, None])) == [[(0, used, 0, used, "causal"), (used, L, 0, used, "rect")]]
    # a query attending keys {0, 2} (not one contiguous range), or a bias that is not 0/min: the full product
    holes = causal.copy()
    holes[2, 1] = False
    assert cpu_kernels._query_groups(_additive(holes[None, None])) is None
    import paddle

    assert cpu_kernels._query_groups(_additive(causal[None, None]) + paddle.full([1], 0.5)) is None


def _prefix_lm(spans, S):
    """A bool [S, S] may-attend mask of prefix-LM examples (start, prompt, end) packed in a row, as ChatGLM v1 and GLM
    build them: the prompt attends itself both ways, a target its prompt and the targets up to itself; the rest of
    the row is padding that attends itself."""
    attend = np.eye(S, dtype=bool)
    for a, p, e in spans:
        attend[a:e, a:e] = np.tril(np.ones([e - a, e - a], bool))
        attend[a:a + p, a:a + p] = True
    return attend


def test_query_groups_and_per_block_attention_of_prefix_lm_masks():
    """Prefix-LM rows (chatglm_segment_attention, glm_segment_attention): a 'rect' group per prompt and a 'prefix' group
    per run of targets (keys from the prompt's start up to each query); per-block attention over them equals the
    masked softmax over the whole row, batch-first and seq-first (ChatGLM v1's layout), additive mask or GLM's 0/1."""
    import paddle

    S = 14
    packed = _prefix_lm([(0, 3, 6), (6, 2, 10)], S)  # two examples and a padding tail of 4
    single = _prefix_lm([(0, 4, 5), (5, 5, 14)], S)  # one target only (a 1-query group: 'rect'), then 4 targets
    groups = cpu_kernels._query_groups(_additive(np.stack([packed, single])[:, None]))
    assert groups == [
        [(0, 3, 0, 3, "rect"), (3, 6, 0, 6, "prefix"), (6, 8, 6, 8, "rect"), (8, 10, 6, 10, "prefix"), (10, 14, 10, 14, "self")],
        [(0, 4, 0, 4, "rect"), (4, 5, 0, 5, "rect"), (5, 10, 5, 10, "rect"), (10, 14, 5, 14, "prefix")],
    ]
    # one target that does not see the whole prompt: no longer the prefix-LM shape of that block
    skew = packed.copy()
    skew[4, 0] = False
    assert [g for g in cpu_kernels._query_groups(_additive(skew[None, None]))[0] if g[4] == "prefix"] == [(8, 10, 6, 10, "prefix")]
    # GLM's 0/1 mask with another value (a weight the model would multiply by) is not taken
    assert cpu_kernels._query_groups(cpu_kernels._glm_as_4d(paddle.to_tensor(packed[None, None].astype("float32") * 0.5))) is None

    attend = np.stack([packed, single])
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(2, S, 3, 4).astype("float32") for _ in range(3))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0 + np.where(attend, 0, -1e30)[:, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v).reshape([2, S, 12])
    for mask, as_4d in ((_additive(attend[:, None]), None), (paddle.to_tensor(attend[:, None].astype("int64")), cpu_kernels._glm_as_4d)):
        cpu_kernels._state.groups = None
        got = cpu_kernels._per_block_attention(*(paddle.to_tensor(t) for t in (q, k, v)), mask, as_4d=as_4d)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)
        cpu_kernels._state.groups = None
        got = cpu_kernels._per_block_attention(*(paddle.to_tensor(t.transpose(1, 0, 2, 3)) for t in (q, k, v)), mask,
                                               as_4d=as_4d, seq_first=True)
        np.testing.assert_allclose(got.numpy(), want.transpose(1, 0, 2), atol=1e-5, rtol=1e-5)
    cpu_kernels._state.groups = None


@pytest.mark.parametrize("family", [f for f in PATCHED if any(p.endswith("_segment_attention") for p in get_family(f).cpu_patches)])
def test_segment_attention_runs_on_packed_and_padded_batches(family, tiny_dir, monkeypatch):
    """The patched attention finds the blocks of both batch kinds the trainer makes (not its fallback; Bloom computes
    per block for packed rows only), with the same logits as the unpatched model (the test above compares loss and
    gradients too)."""
    import paddle

    path = tiny_dir(family)
    plain, patched = _models(family, path)
    plain.eval(), patched.eval()
    seen = []
    real = cpu_kernels._query_groups
    monkeypatch.setattr(cpu_kernels, "_query_groups", lambda m: seen.append(real(m)) or seen[-1])
    for name, batch in _batches(family, path).items():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with paddle.no_grad():
            a, b = (logits_of(m(**inputs)).numpy() for m in (plain, patched))
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=name)
        assert seen and seen[-1] is not None, name
        if get_family(family).prefix_lm:  # ChatGLM v1, GLM: bidirectional prompts (rect), causal targets over them
            want = {"rect", "prefix", "self"}  # (the packed batch's shorter row and the unpacked rows are padded)
        else:
            want = {"causal", "self"} if name == "packed" else {"causal"}
        assert {g[4] for row in seen[-1] for g in row} >= want, name
    assert len(seen) == 2  # analysed once per forward, not once per layer


def test_segment_attention_with_one_mask_row_for_the_whole_batch(tiny_dir):
    """Without an attention mask (pretraining) GPT builds one causal [1, 1, seq, seq] mask for every row: the per-block
    path applies its groups to each row, with the unpatched model's loss and gradients."""
    import paddle

    path = tiny_dir("gpt-3")
    plain, patched = _models("gpt-3", path)
    ids = paddle.to_tensor(np.random.RandomState(0).randint(3, 500, size=[3, 20]).astype("int64"))
    results = []
    for m in (plain, patched):
        m.train()
        out = m(input_ids=ids, labels=ids)
        out[0].backward()
        results.append((float(out[0]), {n: p.grad.numpy().copy() for n, p in m.named_parameters() if p.grad is not None}))
        m.clear_gradients()
    (loss_a, ga), (loss_b, gb) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and ga.keys() == gb.keys()
    for n in ga:
        np.testing.assert_allclose(gb[n], ga[n], atol=1e-5, rtol=1e-4, err_msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_views_same_logits_and_gradients_for_every_family(family, tiny_dir):
    """dense_views() is on for every family (training steps, evaluation, generation): the same forward and
    backward with paddle's stride kernels on and off give the same logits, loss and gradients."""
    path = tiny_dir(family)
    model = get_family(family).load_model(path)
    model.train()
    batches = _batches(family, path)

    def run():
        out = {}
        for name, batch in batches.items():
            model.clear_gradients()
            res = model(**batch)
            loss = res[0] if isinstance(res, (tuple, list)) else res.loss
            loss.backward()
            out[name] = (float(loss), {p.name: p.grad.numpy().copy() for p in model.parameters() if p.grad is not None})
        return out

    plain = run()
    with cpu_kernels.dense_views():
        dense = run()
    for name in batches:
        assert dense[name][0] == pytest.approx(plain[name][0], rel=1e-6, abs=1e-6), name
        grads_a, grads_b = plain[name][1], dense[name][1]
        assert grads_a.keys() == grads_b.keys() and grads_a
        for k in grads_a:
            np.testing.assert_allclose(grads_b[k], grads_a[k], atol=1e-6, rtol=1e-5, err_msg=f"{family} {name}: {k}")


def test_rotary_tables_are_not_shared_between_models(tiny_dir):
    """Two patched LLaMAs with different rotary bases fed the very same position_ids tensor one after the other:
    each gives its own unpatched twin's logits (the tiled tables live for one forward only)."""
    import paddle

    fam = get_family("llama")
    path = tiny_dir("llama")
    inputs = {k: v for k, v in _batches("llama", path)["unpacked"].items() if k != "labels"}
    for theta in (10000.0, 500.0):
        plain = fam.load_model(path, rope_theta=theta)
        patched = cpu_kernels.apply(fam, fam.load_model(path, rope_theta=theta), force=True)
        plain.eval(), patched.eval()
        with paddle.no_grad():
            want, got = (logits_of(m(**inputs)).numpy() for m in (plain, patched))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"rope_theta {theta}")
    assert getattr(cpu_kernels._state, "rotary", None) is None  # nothing kept after the forward


def test_linear_bias_grad_same_values_and_only_where_the_bias_trains(monkeypatch):
    """linear_bias_grad: a plain nn.Linear with a trainable bias gives the class forward's output and gradients (bias
    gradient as one product with a row of ones), with the input needing a gradient or not; a frozen bias, no_grad and
    non-Linear layers keep the class forward (the patch's product is not called)."""
    import paddle

    class Pair(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.lin = paddle.nn.Linear(16, 8)

    plain, patched = Pair(), Pair()
    patched.lin.weight.set_value(plain.lin.weight)
    patched.lin.bias.set_value(plain.lin.bias + 0.5)
    plain.lin.bias.set_value(plain.lin.bias + 0.5)
    assert cpu_kernels._patch_linear_bias_grad(patched) == 1
    sums = []
    real = cpu_kernels._row_sum
    monkeypatch.setattr(cpu_kernels, "_row_sum", lambda t: sums.append(t.shape) or real(t))
    rng = np.random.default_rng(0)
    for x_grad in (True, False):
        data = rng.standard_normal([3, 5, 16]).astype("float32")
        xs = [paddle.to_tensor(data, stop_gradient=not x_grad) for _ in range(2)]
        outs = [m.lin(x) for m, x in zip((plain, patched), xs)]
        for out in outs:
            (out * out).sum().backward()
        np.testing.assert_allclose(outs[1].numpy(), outs[0].numpy(), rtol=1e-6, atol=1e-6)
        for name in ("weight", "bias"):
            np.testing.assert_allclose(getattr(patched.lin, name).grad.numpy(), getattr(plain.lin, name).grad.numpy(), rtol=1e-5, atol=1e-5)
        if x_grad:
            np.testing.assert_allclose(xs[1].grad.numpy(), xs[0].grad.numpy(), rtol=1e-5, atol=1e-5)
        plain.clear_gradients(), patched.clear_gradients()
    assert sums == [[3, 5, 8], [3, 5, 8]]  # the bias gradient of each backward went through the product
    patched.lin.bias.stop_gradient = True  # frozen (LoRA): the class forward
    with paddle.no_grad():
        patched.lin(xs[0])
    (patched.lin(xs[0]) ** 2).sum().backward()
    assert len(sums) == 2
