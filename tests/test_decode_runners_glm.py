"""ChatGLM2's, ChatGLM v1's and GLM's decode runners (families/{chatglm_v2,chatglm,glm}_decode.py on
families/decode_core.py: KV cache written in place and grown, prompts prefilled in chunks of rows of similar
length) give the model's own logits at every step -- against the model driven as generate() drives it
(prepare_inputs_for_generation, its cache, update_model_kwargs_for_generation: ChatGLM2's concatenated cache, v1's
growing 4-D mask and block positions, GLM's hidden-state memories and laid-out positions) -- on a left-padded
batch of mixed prompt lengths with a padding hole inside one row, with a cache that grows on the way; they decline
what they do not reproduce, and PADDLELLM_CPU_KERNELS=0 turns them off."""
import numpy as np
import pytest

from paddlellm import cpu_kernels
from paddlellm.families import decode_core, get_family
from paddlellm.families import chatglm_decode, chatglm_v2_decode, glm_decode

from test_decode_runners import TEXTS  # 10 prompts of scattered lengths: more than one prefill chunk
RUNNERS = {"chatglm_v2": chatglm_v2_decode.ChatGLMv2Decoder, "chatglm": chatglm_decode.ChatGLMDecoder,
           "glm": glm_decode.GLMDecoder}
STEPS = 4


def _inputs(fam, tok, hole: bool = True, new: int = STEPS):
    """Left-padded generation inputs; with hole, row 1 (the longest prompt) has a column in its middle that no
    other position attends (2-D mask: a 0; 4-D mask: a 0 in that column of every other row)."""
    import paddle

    from paddlellm.generation import _generation_inputs

    assert len(TEXTS) > decode_core.PREFILL_ROWS
    prompts = [fam.generation_prompt(tok, [t], [], 64) for t in TEXTS]
    inputs = _generation_inputs(fam, tok, prompts, new)
    if hole:
        mask = inputs["attention_mask"]
        row, col = 1, inputs["input_ids"].shape[1] - len(prompts[1]) + 3  # inside row 1's prompt
        if mask.ndim == 2:
            assert mask[row, col] == 1
            mask[row, col] = 0
        else:
            assert mask[row, 0, -1, col] == 1
            mask[row, 0, :, col] = 0
            mask[row, 0, col, col] = 1
    return {k: paddle.to_tensor(v) for k, v in inputs.items()}


def _check_steps(model, fam, inputs, grow=2):
    """Prefill and STEPS steps against the model's own cached forward as generate() runs it, with a cache that starts
    `grow` slots past the prompt and grows on the way. Returns the largest logit (the comparison is not of zeros)."""
    import paddle

    from paddlellm.families import logits_of

    kwargs = dict(inputs)
    ids = kwargs.pop("input_ids")
    kwargs["use_cache"] = True
    batch, prompt = ids.shape
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        runner = fam.decode_runner(model)
        assert isinstance(runner, RUNNERS[fam.name]), RUNNERS[fam.name].unsupported(model)
        got = runner.prefill(inputs, prompt + STEPS)
        assert runner.capacity == prompt + grow
        for step in range(STEPS + 1):
            out = model(**model.prepare_inputs_for_generation(ids, **kwargs))
            want = logits_of(out)[:, -1, :]
            assert got.shape == want.shape == [batch, model.config.vocab_size]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"step {step}")
            if step == STEPS:
                break
            nxt = paddle.to_tensor(rng.integers(3, model.config.vocab_size, size=[batch, 1]))
            ids = paddle.concat([ids, nxt], axis=1)
            kwargs = model.update_model_kwargs_for_generation(out, kwargs)
            got = runner.step(nxt)
        assert runner.capacity == runner.max_capacity == prompt + STEPS  # it grew, to the cap
    return float(np.abs(got.numpy()).max())


@pytest.mark.parametrize("name", list(RUNNERS))
def test_every_step_gives_the_models_own_logits(loaded, name, monkeypatch):
    model, tok, fam = loaded(name)
    monkeypatch.setattr(decode_core, "KV_GROW", 2)
    assert _check_steps(model, fam, _inputs(fam, tok)) > 0.1


@pytest.mark.parametrize("name,overrides", [
    ("chatglm_v2", dict(apply_residual_connection_post_layernorm=True, apply_query_key_layer_scaling=False,
                        post_layer_norm=False, multi_query_group_num=1)),
    ("chatglm", dict(attention_scale=False)),
], ids=["chatglm_v2-post-norm-residual-one-group", "chatglm-no-attention-scale"])
def test_config_variants_give_the_models_own_logits(loaded, tiny_dir, name, overrides, monkeypatch):
    """The branches the tiny configs do not take: ChatGLM2's residual after the norm, no query-key layer scaling,
    no final norm, a single multi-query group; ChatGLM v1 without attention_scale (scores still times layer_id + 1)."""
    import paddle

    _, tok, fam = loaded(name)
    paddle.seed(1)
    model = fam.new_model(tiny_dir(name), **overrides)
    model.eval()
    assert all(getattr(model.config, k) == v for k, v in overrides.items())
    monkeypatch.setattr(decode_core, "KV_GROW", 2)
    _check_steps(model, fam, _inputs(fam, tok))


def test_lora_layers_act_as_in_the_model(loaded, tiny_dir, monkeypatch):
    """ChatGLM2 with LoRA on query_key_value and dense (LoRA B set non-zero, so the adapters change the logits): the
    runner drives the LoRA layers themselves."""
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    _, tok, fam = loaded("chatglm_v2")
    paddle.seed(0)
    lora = LoRAModel(fam.load_model(tiny_dir("chatglm_v2")),
                     LoRAConfig(target_modules=[".*query_key_value.*", ".*self_attention.dense.*"], r=4))
    lora.eval()
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.set_value(paddle.randn(p.shape) * 0.05)
    monkeypatch.setattr(decode_core, "KV_GROW", 2)
    _check_steps(lora, fam, _inputs(fam, tok))


def test_runners_decline_what_they_do_not_reproduce(loaded, tiny_dir):
    import paddle

    for name, runner in RUNNERS.items():
        model, _, fam = loaded(name)
        other = loaded("chatglm" if name == "glm" else "glm")[0]
        assert runner.unsupported(other).startswith("not a ")
        model.train()
        try:
            assert runner.unsupported(model) == "training mode"
            assert fam.decode_runner(model) is None
        finally:
            model.eval()
    paddle.seed(0)
    one_d = get_family("chatglm").new_model(tiny_dir("chatglm"), position_encoding_2d=False)
    one_d.eval()
    assert chatglm_decode.unsupported(one_d) == "position_encoding_2d False"
    scaled = get_family("glm").new_model(tiny_dir("glm"), attention_scale=2.0)
    scaled.eval()
    assert glm_decode.unsupported(scaled) == "attention_scale > 1"
    flash = get_family("chatglm_v2").new_model(tiny_dir("chatglm_v2"), use_flash_attention=True)
    flash.eval()
    assert chatglm_v2_decode.unsupported(flash) == "use_flash_attention"
    # v1/GLM take the 4-D prompt mask their models take: a 2-D one is refused by name, not misread
    model, tok, fam = loaded("glm")
    inputs = _inputs(fam, tok, hole=False)
    inputs["attention_mask"] = inputs["attention_mask"][:, 0, -1, :]
    with pytest.raises(ValueError, match="attention mask"), paddle.no_grad():
        fam.decode_runner(model).prefill(inputs, inputs["input_ids"].shape[1] + 1)
    # a GLM mask laid out past the prompt (paddlenlp would read the later rows from it) is refused, not misread
    inputs = _inputs(fam, tok, hole=False)
    inputs["attention_mask"] = paddle.nn.functional.pad(inputs["attention_mask"].astype("float32"), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="laid out"), paddle.no_grad():
        fam.decode_runner(model).prefill(inputs, inputs["input_ids"].shape[1] + 1)


@pytest.mark.parametrize("name", list(RUNNERS))
def test_generation_runs_through_the_runner_unless_switched_off(loaded, name, monkeypatch):
    """generate_batch's own loop takes the family's runner on CPU and the model's forward with
    PADDLELLM_CPU_KERNELS=0; seeded sampled tokens equal paddlenlp's generate() either way (greedy: test_decode_loop)."""
    import paddle

    from paddlellm import decode_loop
    from paddlellm.generation import generate_batch

    model, tok, fam = loaded(name)
    used = []
    real = decode_loop.decode_ids

    def spy(*a, **kw):
        used.append(kw.get("runner"))
        return real(*a, **kw)

    monkeypatch.setattr(decode_loop, "decode_ids", spy)
    new = 8
    inputs = _inputs(fam, tok, hole=False, new=new)

    def run(own_loop):
        paddle.seed(7)
        return generate_batch(model, fam, dict(inputs), new, fam.stop_token_id(tok), tok.pad_token_id, own_loop=own_loop,
                              top_k=0, top_p=0.9, temperature=0.8).numpy()

    with_runner = run(True)
    assert isinstance(used[-1], RUNNERS[name])
    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")
    forward = run(True)
    assert used[-1] is None
    np.testing.assert_array_equal(with_runner, forward)
    np.testing.assert_array_equal(with_runner, run(False))
    assert len({tuple(r) for r in with_runner.tolist()}) > 3  # the rows really differ
