"""GPT's, OPT's and BLOOM's decode runners (families/{gpt,opt,bloom}_decode.py on families/decode_core.py: KV cache
written in place and grown, prompts prefilled in chunks of rows of similar length) give the model's own logits at
every step: a left-padded batch of mixed prompt lengths with a padding hole inside one row (BLOOM's ALiBi and OPT's
positions both count only attended tokens), a cache that grows on the way, a LoRA model, GPT's fused qkv."""
import numpy as np
import pytest

from paddlellm.families import decode_core, get_family
from paddlellm.families.bloom_decode import BloomDecoder
from paddlellm.families.gpt_decode import GPTDecoder
from paddlellm.families.opt_decode import OPTDecoder

# 10 prompts of scattered lengths: more than one prefill chunk of PREFILL_ROWS rows, not sorted by length
TEXTS = ["hi", "spell: 1 2 3 4 5 6 7 8 and more words here", "x y", "one two three four five", "a", "spell: 9 8 7",
         "hello there how are you today", "z", "one two", "q w e r t y"]
RUNNERS = {"gpt-3": GPTDecoder, "opt": OPTDecoder, "bloom": BloomDecoder}
STEPS = 4


def _inputs(fam, tok, hole: bool):
    """Left-padded generation inputs; with hole, row 1 (the longest prompt) has an unattended column in its middle."""
    import paddle

    from paddlellm.generation import _generation_inputs

    assert len(TEXTS) > decode_core.PREFILL_ROWS
    prompts = [fam.generation_prompt(tok, [t], [], 64) for t in TEXTS]
    inputs = _generation_inputs(fam, tok, prompts, STEPS)
    if hole:
        row = 1
        assert inputs["attention_mask"][row].all()  # the longest row: no left padding, so the hole is inside
        inputs["attention_mask"][row, 3] = 0
    return {k: paddle.to_tensor(v) for k, v in inputs.items()}


def _check_steps(model, fam, inputs, monkeypatch, grow=2, runners=None):
    """Prefill and STEPS steps against the model's full forward over everything so far (no cache), with a cache that
    starts `grow` slots past the prompt and grows on the way (the runner appended to `runners` when given)."""
    import paddle

    from paddlellm.families import logits_of

    monkeypatch.setattr(decode_core, "KV_GROW", grow)
    seen = dict(inputs)
    batch, prompt = seen["input_ids"].shape
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        runner = fam.decode_runner(model)
        assert runner is not None, RUNNERS[fam.name].unsupported(model)
        got = runner.prefill(inputs, prompt + STEPS)
        assert runner.capacity == prompt + grow
        for step in range(STEPS + 1):
            want = logits_of(model(**seen))[:, -1, :]
            assert got.shape == want.shape == [batch, model.config.vocab_size]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"step {step}")
            if step == STEPS:
                break
            nxt = paddle.to_tensor(rng.integers(3, model.config.vocab_size, size=[batch, 1]))
            seen["input_ids"] = paddle.concat([seen["input_ids"], nxt], axis=1)
            seen["attention_mask"] = paddle.concat([seen["attention_mask"], paddle.ones_like(nxt)], axis=1)
            if "position_ids" in seen:
                seen["position_ids"] = paddle.concat([seen["position_ids"], seen["position_ids"][:, -1:] + 1], axis=1)
            got = runner.step(nxt)
        assert runner.capacity == runner.max_capacity == prompt + STEPS  # it grew, to the cap
    if runners is not None:
        runners.append(runner)
    return np.abs(got.numpy()).max()


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_every_step_gives_the_models_own_logits(loaded, name, monkeypatch):
    model, tok, fam = loaded(name)
    assert isinstance(fam.decode_runner(model), RUNNERS[name])
    assert _check_steps(model, fam, _inputs(fam, tok, hole=True), monkeypatch) > 0.1  # real logits, not zeros


def test_lora_model_gives_its_own_logits(loaded, tiny_dir, monkeypatch):
    """OPT with LoRA on q/v (random B matrices, so the adapters change the output): the runner calls the LoRA layers."""
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    model, tok, fam = loaded("opt")
    paddle.seed(5)
    lora = LoRAModel(fam.load_model(tiny_dir("opt")), LoRAConfig(target_modules=[".*q_proj.*", ".*v_proj.*"], r=4))
    lora.eval()
    for pname, param in lora.named_parameters():
        if "lora_B" in pname:
            param.set_value(paddle.randn(param.shape) * 0.5)
    inputs = _inputs(fam, tok, hole=False)
    with paddle.no_grad():
        plain = fam.decode_runner(model).prefill(inputs, inputs["input_ids"].shape[1] + 1)
        adapted = fam.decode_runner(lora).prefill(inputs, inputs["input_ids"].shape[1] + 1)
    assert np.abs(adapted.numpy() - plain.numpy()).max() > 1e-2  # the adapters matter
    _check_steps(lora, fam, inputs, monkeypatch)


def test_gpt_fused_qkv_and_post_norm(loaded, tiny_dir, monkeypatch):
    """GPT with fuse_attention_qkv (one [h, 3h] projection split per head) and normalize_before=False (post-LN)."""
    import paddle

    _, tok, fam = loaded("gpt-3")
    paddle.seed(2)
    model = fam.new_model(tiny_dir("gpt-3"), fuse_attention_qkv=True, normalize_before=False)
    model.eval()
    assert model.gpt.decoder.layers[0].self_attn.qkv_proj is not None
    _check_steps(model, fam, _inputs(fam, tok, hole=False), monkeypatch)


def test_unsupported_configurations_use_the_models_forward(loaded, tiny_dir):
    import paddle

    for name, runner in RUNNERS.items():
        model, _, fam = loaded(name)
        assert runner.unsupported(model) is None
        model.train()
        try:
            assert runner.unsupported(model) == "training mode"
            assert fam.decode_runner(model) is None
        finally:
            model.eval()
        other = loaded("gpt-3" if name != "gpt-3" else "opt")[0]
        assert runner.unsupported(other).startswith("not a")  # each runner only drives its own model class
    bloom = loaded("bloom")[0]
    bloom.config.use_long_sequence_strategies = True
    try:
        assert BloomDecoder.unsupported(bloom) == "use_long_sequence_strategies"
    finally:
        bloom.config.use_long_sequence_strategies = False
    half = get_family("gpt-3").load_model(tiny_dir("gpt-3"), dtype="float16")  # not .to(): it casts the int mask buffer too
    half.eval()
    assert GPTDecoder.unsupported(half) == "weights not float32"
    with paddle.no_grad():  # the capacity asked is the most it holds
        runner = get_family("opt").decode_runner(loaded("opt")[0])
        runner.prefill({"input_ids": paddle.to_tensor([[5, 6, 7]])}, capacity=4)
        runner.step(paddle.to_tensor([[8]]))
        with pytest.raises(ValueError, match="holds 4 tokens"):
            runner.step(paddle.to_tensor([[9]]))


@pytest.mark.parametrize("fixture", ["opt-proj", "bloom", "gpt2"])
def test_transformers_checkpoints_give_their_own_logits(fixture, monkeypatch):
    """transformers' tiny checkpoints, converted on load: OPT with word_embed_proj_dim 16 != hidden 32 (project_in and
    project_out, as OPT-350m), BLOOM, GPT-2 (its fused c_attn split into q/k/v)."""
    import os

    from paddlellm.loading import load_for_inference

    from conftest import ROOT

    model, tok, fam, _ = load_for_inference(os.path.join(ROOT, "tests", "fixtures", "hf", fixture))
    if fixture == "opt-proj":
        assert model.opt.embeddings.project_in is not None and model.opt.decoder.project_out is not None
    _check_steps(model, fam, _inputs(fam, tok, hole=fixture == "bloom"), monkeypatch)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_kernels_off_turns_the_runner_off_with_the_same_tokens(loaded, name, monkeypatch):
    """PADDLELLM_CPU_KERNELS=0: the decode loop gets no runner (the model's own forward); greedy tokens unchanged."""
    import paddle

    from paddlellm import cpu_kernels, decode_loop
    from paddlellm.generation import generate_batch

    model, tok, fam = loaded(name)
    inputs = _inputs(fam, tok, hole=False)
    used = []
    real_decode = decode_loop.decode_ids
    monkeypatch.setattr(decode_loop, "decode_ids", lambda *a, **kw: used.append(kw.get("runner")) or real_decode(*a, **kw))

    def run():
        with paddle.no_grad():
            return generate_batch(model, fam, dict(inputs), 6, fam.stop_token_id(tok), tok.pad_token_id, own_loop=True).numpy()

    on = run()
    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")
    off = run()
    assert isinstance(used[0], RUNNERS[name]) and used[1] is None
    np.testing.assert_array_equal(on, off)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_batch_one_tied_head_copy_gives_the_models_logits_and_tokens(loaded, name, monkeypatch):
    """Batch 1, tied embeddings, HEAD_COPY_MIN reached: the steps' head is a product on the runner's [h, vocab] copy
    (DecodeCore._tied_head); the model's own logits every step and generate()'s greedy tokens."""
    import paddle

    from paddlellm.generation import _generation_inputs, generate_batch

    monkeypatch.setattr(decode_core, "HEAD_COPY_MIN", 0)
    model, tok, fam = loaded(name)
    one = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, [fam.generation_prompt(tok, [TEXTS[1]], [], 64)], 8).items()}
    runners = []
    _check_steps(model, fam, one, monkeypatch, runners=runners)
    weight = model.get_input_embeddings().weight
    assert runners[0]._head_t is not None and runners[0]._head_t.shape == weight.shape[::-1]
    with paddle.no_grad():
        args = (model, fam, one, 8, fam.stop_token_id(tok), tok.pad_token_id)
        np.testing.assert_array_equal(generate_batch(*args, own_loop=True).numpy(), generate_batch(*args, own_loop=False).numpy())
