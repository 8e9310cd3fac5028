"""LLaMA's decode runner (families/llama_decode.py: KV cache written in place, prompts prefilled in chunks of
rows of similar length) gives the model's own logits at every step and generate()'s tokens."""
import numpy as np
import pytest

from paddlellm import cpu_kernels
from paddlellm.families import get_family
from paddlellm.families import decode_core, llama_decode

LLAMA = get_family("llama")
# 11 prompts of scattered lengths (more than one prefill chunk of PREFILL_ROWS rows, not sorted by length)
TEXTS = ["hi", "spell: 1 2 3 4 5 6 7 8 and more words here to make it long", "x y", "one two three four five",
         "a", "spell: 9 8 7", "hello there how are you today my friend", "z", "one two", "spell: 4 4 4 4 4 4 4", "q w e r t y"]


@pytest.fixture(scope="module")
def loaded(llama):
    from paddlellm.loading import load_for_inference

    model, tok, fam, _ = load_for_inference(llama)
    return model, tok


def _inputs(tok, texts, new, fam=LLAMA):
    import paddle

    from paddlellm.generation import _generation_inputs

    prompts = [fam.generation_prompt(tok, [t], [], 64) for t in texts]
    assert len(texts) > decode_core.PREFILL_ROWS or len(texts) == 1
    return {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, new).items()}


def test_runner_is_used_where_exact_and_declines_the_rest(loaded, llama):
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    model, _ = loaded
    assert LLAMA.decode_runner(model) is not None
    lora = LoRAModel(LLAMA.load_model(llama), LoRAConfig(target_modules=[".*q_proj.*", ".*v_proj.*"], r=4))
    lora.eval()
    assert LLAMA.decode_runner(lora) is not None  # LoRA layers are the model's own sublayers: driven as they are
    gqa = LLAMA.new_model(llama, num_key_value_heads=2)
    gqa.eval()
    assert llama_decode.unsupported(gqa) is None  # grouped-query attention: driven (logits tested below)
    odd = LLAMA.new_model(llama, num_key_value_heads=3)
    odd.eval()
    assert llama_decode.unsupported(odd) == "query heads not a multiple of key/value heads"
    assert LLAMA.decode_runner(odd) is None
    fused = LLAMA.new_model(llama, fuse_attention_qkv=True)
    fused.eval()
    assert "fuse_attention_qkv" in llama_decode.unsupported(fused)
    model.train()
    try:
        assert llama_decode.unsupported(model) == "training mode"
    finally:
        model.eval()
    assert get_family("gpt-3").decode_runner(model) is None  # the registry's default: the model's own forward
    with paddle.no_grad():
        runner = LLAMA.decode_runner(model)
        runner.prefill({"input_ids": paddle.to_tensor([[5, 6, 7]])}, capacity=4)
        runner.step(paddle.to_tensor([[8]]))
        with pytest.raises(ValueError, match="holds 4 tokens"):
            runner.step(paddle.to_tensor([[9]]))


@pytest.mark.parametrize("grow", [None, 2], ids=["cache-allocated-once", "cache-grows-every-2-steps"])
def test_every_step_gives_the_models_own_logits(loaded, grow, monkeypatch):
    """Prefill and 6 steps against the model's full forward over everything so far (no cache), row by row; also
    with a cache that starts small and grows (copied into a larger one) on the way."""
    if grow:
        monkeypatch.setattr(decode_core, "KV_GROW", grow)
    model, tok = loaded
    _check_steps(model, tok, grow)


def test_grouped_query_attention_gives_the_models_own_logits(loaded, llama):
    """num_key_value_heads 2 of 4 heads (repeat_kv in paddlenlp): the runner attends per group, same logits."""
    _, tok = loaded
    gqa = LLAMA.new_model(llama, num_key_value_heads=2)
    gqa.eval()
    runner = LLAMA.decode_runner(gqa)
    assert runner.kv_heads == 2 and runner.groups == 2
    _check_steps(gqa, tok, None)
    from paddlellm.generation import generate_batch

    args = (gqa, LLAMA, _inputs(tok, TEXTS, 8), 8, LLAMA.stop_token_id(tok), tok.pad_token_id)
    np.testing.assert_array_equal(generate_batch(*args, own_loop=True).numpy(), generate_batch(*args, own_loop=False).numpy())


def _check_steps(model, tok, grow, fam=LLAMA, texts=None):
    import paddle

    from paddlellm.families import logits_of

    inputs = _inputs(tok, texts or TEXTS, 6, fam)
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        runner = fam.decode_runner(model)
        got = runner.prefill(inputs, ids.shape[1] + 6)
        first = runner.capacity
        for step in range(7):
            want = logits_of(model(input_ids=ids, attention_mask=mask, position_ids=pos))[:, -1, :]
            assert got.shape == want.shape == [len(texts or TEXTS), model.config.vocab_size]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"step {step}")
            if step == 6:
                break
            nxt = paddle.to_tensor(rng.integers(3, model.config.vocab_size, size=[len(texts or TEXTS), 1]))
            ids = paddle.concat([ids, nxt], axis=1)
            mask = paddle.concat([mask, paddle.ones_like(nxt)], axis=1)
            pos = paddle.concat([pos, pos[:, -1:] + 1], axis=1)
            got = runner.step(nxt)
        if grow:
            prompt = inputs["input_ids"].shape[1]
            assert first == prompt + 2 and runner.capacity == runner.max_capacity == prompt + 6  # it grew, to the cap
    return runner


@pytest.mark.parametrize("settings", [{}, {"top_k": 0, "top_p": 0.9, "temperature": 0.7, "seed": 3},
                                      {"repetition_penalty": 1.3}], ids=["greedy", "sampling", "penalty"])
def test_same_tokens_as_the_model_forward_and_generate(loaded, settings, monkeypatch):
    import paddle

    from paddlellm import decode_loop
    from paddlellm.generation import generate_batch

    model, tok = loaded
    settings = dict(settings)
    seed = settings.pop("seed", None)
    inputs = _inputs(tok, TEXTS, 12)
    used = []
    real_decode = decode_loop.decode_ids

    def spy(*a, **kw):
        used.append(kw.get("runner"))
        return real_decode(*a, **kw)

    monkeypatch.setattr(decode_loop, "decode_ids", spy)

    def run(own_loop):
        if seed is not None:
            paddle.seed(seed)
        return generate_batch(model, LLAMA, dict(inputs), 12, LLAMA.stop_token_id(tok), tok.pad_token_id, own_loop=own_loop,
                              **settings).numpy()

    with_runner = run(True)
    assert isinstance(used[-1], llama_decode.LlamaDecoder)
    monkeypatch.setenv(cpu_kernels.DISABLE_VAR, "0")  # CPU kernels off: no runner, the model's own forward
    forward = run(True)
    assert used[-1] is None
    reference = run(False)  # paddlenlp's generate()
    assert with_runner.shape == (len(TEXTS), 12)
    np.testing.assert_array_equal(with_runner, forward)
    np.testing.assert_array_equal(with_runner, reference)
    assert len({tuple(r) for r in with_runner.tolist()}) > 3  # the rows really differ


def test_prefill_chunks_group_rows_of_similar_length():
    chunks = [c.tolist() for c in decode_core.prefill_chunks([100, 280, 150, 200, 120, 110, 100, 100])]
    assert chunks == [[1], [3, 2], [4, 5, 0, 6, 7]]  # each row >= 3/4 of its chunk's longest; longest first
    assert [len(c) for c in decode_core.prefill_chunks([7] * 20)] == [8, 8, 4]  # at most PREFILL_ROWS rows


def test_a_growing_cache_gives_the_same_tokens(loaded, monkeypatch):
    """A cache that starts with 3 free slots and grows several times on the way: generate()'s greedy tokens."""
    from paddlellm.generation import generate_batch

    model, tok = loaded
    inputs = _inputs(tok, TEXTS, 12)
    args = (model, LLAMA, dict(inputs), 12, LLAMA.stop_token_id(tok), tok.pad_token_id)
    reference = generate_batch(*args, own_loop=False).numpy()
    monkeypatch.setattr(decode_core, "KV_GROW", 3)
    grown = generate_batch(*args, own_loop=True).numpy()
    np.testing.assert_array_equal(grown, reference)


@pytest.mark.parametrize("source", ["tiny", "transformers"])
def test_qwen2_runner_gives_the_models_own_logits_and_generates_its_tokens(source, tiny_dir, monkeypatch):
    """Qwen2's runner (families/qwen2_decode.py: this runner on Qwen2's layers) on the tiny Qwen2 (grouped-query
    attention, random q/k/v biases, tied embeddings) and on transformers' tiny Qwen2 (trained biases, untied head):
    the model's own logits at every step, generate()'s tokens greedy and sampled."""
    import os

    import paddle

    from paddlellm.families.qwen2_decode import Qwen2Decoder
    from paddlellm.generation import generate_batch
    from paddlellm.loading import load_for_inference

    from conftest import ROOT

    folder = tiny_dir("qwen2") if source == "tiny" else os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")
    model, tok, fam, _ = load_for_inference(folder)
    runner = fam.decode_runner(model)
    assert isinstance(runner, Qwen2Decoder) and runner.kv_heads == 2 and runner.groups == 2
    assert LLAMA.decode_runner(model) is None and llama_decode.unsupported(model).startswith("not a LlamaForCausalLM")
    _check_steps(model, tok, None, fam)
    monkeypatch.setattr(decode_core, "HEAD_COPY_MIN", 0)  # batch 1: the tied head's [h, vocab] copy
    ran = _check_steps(model, tok, None, fam, texts=TEXTS[1:2])
    assert (ran._head_t is not None) == (source == "tiny")  # tied here; transformers' fixture is untied
    for settings in ({}, {"top_k": 0, "top_p": 0.9, "temperature": 0.7}):
        def run(own_loop):
            paddle.seed(3)
            return generate_batch(model, fam, _inputs(tok, TEXTS, 10, fam), 10, fam.stop_token_id(tok), tok.pad_token_id,
                                  own_loop=own_loop, **settings).numpy()

        np.testing.assert_array_equal(run(True), run(False))


def test_tied_head_copy_gives_the_models_own_logits(loaded, llama, monkeypatch):
    """Tied embeddings, batch 1, HEAD_COPY_MIN reached: the steps' head is a product on the runner's own [h, vocab]
    copy of the embedding (DecodeCore._tied_head); the model's logits every step, generate()'s greedy tokens. A
    batch of several rows keeps the transposed product."""
    import paddle

    from paddlellm.generation import generate_batch

    _, tok = loaded
    tied = LLAMA.new_model(llama, tie_word_embeddings=True)
    tied.eval()
    assert tied.lm_head.transpose_y
    monkeypatch.setattr(decode_core, "HEAD_COPY_MIN", 0)
    runner = _check_steps(tied, tok, None, texts=TEXTS[1:2])
    assert runner._head_t is not None and runner._head_t.shape == [tied.config.hidden_size, tied.config.vocab_size]
    assert _check_steps(tied, tok, None)._head_t is None
    with paddle.no_grad():
        args = (tied, LLAMA, _inputs(tok, TEXTS[1:2], 8), 8, LLAMA.stop_token_id(tok), tok.pad_token_id)
        np.testing.assert_array_equal(generate_batch(*args, own_loop=True).numpy(), generate_batch(*args, own_loop=False).numpy())
