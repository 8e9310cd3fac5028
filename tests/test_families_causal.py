"""The causal families chatglm_v2, bloom, gpt-3, opt and qwen2 on their tiny random checkpoints.

Each test checks numbers: exact label layouts, loss against a hand-computed cross-entropy, packed
logits against per-example logits, batched left-padded generation against one prompt at a time,
and that prefix tuning / LoRA train exactly the parameters they should.
"""
import json
import os
import re

import numpy as np
import pytest

from paddlellm.runtime import setup_runtime

setup_runtime()  # before paddle is imported

import paddle  # noqa: E402

from paddlellm.families import IGNORE, Example, family_of, find_by_name, get_family  # noqa: E402

FAMILIES = ["chatglm_v2", "bloom", "gpt-3", "opt", "qwen2"]

# What each family's chat format must look like, written from the real models' conventions
# (token texts, not ids, so the expectation does not depend on how the tiny vocabulary was trained).
FORMAT = {
    "chatglm_v2": dict(bos=["[gMASK]", "sop"], prompt="[Round {n}]\n\n问：{q}\n\n答：", eos="</s>", pad="<unk>"),
    "bloom": dict(bos=[], prompt="{q}", eos="</s>", pad="<pad>"),
    "gpt-3": dict(bos=[], prompt="{q}", eos="<|endoftext|>", pad="<|endoftext|>"),
    "opt": dict(bos=["</s>"], prompt="{q}", eos="</s>", pad="<pad>"),
    # ChatML; later turns open with the "\n" after the previous <|im_end|>; replies end with <|im_end|>, not eos
    "qwen2": dict(bos=[], prompt="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", turn_sep="\n",
                  eos="<|endoftext|>", reply_end="<|im_end|>", pad="<|endoftext|>"),
}

EX1 = (["spell: 6 0 3 1"], ["six zero three one"])
EX2 = (["spell: 7 2", "Question: what is the capital of France?"], ["seven two", "Paris is the capital of France."])


def load(tiny_dir, name):
    fam = get_family(name)
    path = tiny_dir(name)
    tok = fam.load_tokenizer(path)
    paddle.seed(0)
    model = fam.load_model(path)
    model.eval()
    return fam, tok, model


def examples(fam, tok):
    return [fam.encode(tok, src, tgt, 128, 64) for src, tgt in (EX1, EX2)]


def forward(model, batch):
    """(loss or None, logits as numpy) of a numpy batch."""
    out = model(**{k: paddle.to_tensor(v) for k, v in batch.items()}, return_dict=True)
    return out.loss, out.logits.numpy()


def manual_loss(logits, labels):
    """Mean token cross-entropy over the labels that are not IGNORE, in float64."""
    logits = logits.astype("float64")
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = labels != IGNORE
    return float(-logp[keep, labels[keep]].mean())


def ids_of(tok, texts):
    return [tok.convert_tokens_to_ids(t) for t in texts]


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_checkpoint_and_tokenizer(tiny_dir, name):
    fam, tok, model = load(tiny_dir, name)
    path = tiny_dir(name)
    assert family_of(path) is fam
    assert find_by_name(fam.example_checkpoint) is fam
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] in fam.model_types  # family_of works without our metadata too

    for text in ["The quick brown fox jumps over the lazy dog.", "spell: 6 0 3 1", "Paris is the capital of France."]:
        ids = fam.encode_text(tok, text)
        assert tok.decode(ids) == text

    fmt = FORMAT[name]
    assert tok.eos_token_id == tok.convert_tokens_to_ids(fmt["eos"])
    assert tok.pad_token_id == tok.convert_tokens_to_ids(fmt["pad"])
    assert fam.bos_ids(tok) == ids_of(tok, fmt["bos"])
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert all(0 <= i < cfg.vocab_size for i in fam.bos_ids(tok) + [tok.eos_token_id, tok.pad_token_id])

    # Really tiny (ChatGLMv2Config silently replaces a `num_layers` kwarg by its 28-layer default) and
    # really random: an all-zero Linear would make attention or MLP a no-op and the tests below vacuous.
    assert fam.prefix_config_kwargs(cfg)["num_hidden_layers"] == 2
    linears = [(n, l) for n, l in model.named_sublayers() if isinstance(l, paddle.nn.Linear)]
    assert linears
    zero = [n for n, l in linears if float(l.weight.abs().max()) == 0.0]
    assert not zero, (
        f"tiny {name} has all-zero Linear weights ({zero[:2]} ...): build_tiny must call Family.init_new_weights"
    )


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("name", FAMILIES)
def test_two_turn_labels_exact(tiny_dir, name):
    fam = get_family(name)
    tok = fam.load_tokenizer(tiny_dir(name))
    fmt = FORMAT[name]
    (q0, q1), (a0, a1) = EX2

    def text_ids(text):
        return list(tok(text, add_special_tokens=False)["input_ids"])

    bos = ids_of(tok, fmt["bos"])
    p0 = text_ids(fmt["prompt"].format(n=1, q=q0))
    p1 = text_ids(fmt.get("turn_sep", "") + fmt["prompt"].format(n=2, q=q1))
    r0, r1 = text_ids(a0), text_ids(a1)
    eos = tok.convert_tokens_to_ids(fmt.get("reply_end", fmt["eos"]))

    ex = fam.encode(tok, [q0, q1], [a0, a1], src_length=256, tgt_length=64)
    full = bos + p0 + r0 + [eos] + p1 + r1 + [eos]
    assert ex.input_ids == full[:-1]
    # Shifted: position i is trained to predict token i+1; both replies and their eos are supervised.
    assert ex.labels == [IGNORE] * (len(bos) + len(p0) - 1) + r0 + [eos] + [IGNORE] * len(p1) + r1 + [eos]
    assert ex.positions == list(range(len(full) - 1))
    assert not ex.truncated

    # The generation prompt of the second turn is the training context up to the reply.
    assert fam.generation_prompt(tok, [q0, q1], [a0], 256) == bos + p0 + r0 + [eos] + p1


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("name", FAMILIES)
def test_simple_batch_loss_is_token_mean_cross_entropy(tiny_dir, name):
    fam, tok, model = load(tiny_dir, name)
    e1, e2 = examples(fam, tok)
    batch = fam.build_batch([[e1], [e2]], tok.pad_token_id)
    assert batch["attention_mask"].ndim == 2  # one example per row: a padding mask suffices
    loss, logits = forward(model, batch)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), manual_loss(logits, batch["labels"]), rtol=1e-5)
    # Padding changes nothing: each example alone has the same logits as in the padded batch.
    for row, e in enumerate((e1, e2)):
        _, alone = forward(model, fam.build_batch([[e]], tok.pad_token_id))
        np.testing.assert_allclose(logits[row, : len(e)], alone[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_row_equals_examples_alone(tiny_dir, name):
    fam, tok, model = load(tiny_dir, name)
    e1, e2 = examples(fam, tok)
    pad = tok.pad_token_id
    if not fam.supports["intokens"]:
        with pytest.raises(NotImplementedError, match="intokens"):
            fam.build_batch([[e1, e2]], pad)
        return

    n1, n2 = len(e1), len(e2)
    packed = fam.build_batch([[e1, e2], [e2]], pad, seq_len=n1 + n2 + 3)  # with padding rows and a tail
    loss, logits = forward(model, packed)
    _, alone1 = forward(model, fam.build_batch([[e1]], pad))
    _, alone2 = forward(model, fam.build_batch([[e2]], pad))
    np.testing.assert_allclose(logits[0, :n1], alone1[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, n1 : n1 + n2], alone2[0], atol=1e-5)
    np.testing.assert_allclose(logits[1, :n2], alone2[0], atol=1e-5)
    # Hence the packed loss is the token-weighted loss of the same examples unpacked.
    unpacked_loss, _ = forward(model, fam.build_batch([[e1], [e2], [e2]], pad))
    np.testing.assert_allclose(float(loss), float(unpacked_loss), rtol=1e-5)

    # Control: the same row as one plain causal sequence does leak, so the check above can fail.
    joined = Example(e1.input_ids + e2.input_ids, e1.labels + e2.labels, list(range(n1 + n2)))
    _, leaky = forward(model, fam.build_batch([[joined]], pad))
    assert np.abs(leaky[0, n1 : n1 + n2] - alone2[0]).max() > 1e-3


# ---------------------------------------------------------------------------------------------- 5
def generate(fam, tok, model, prompts):
    """Greedy ids per prompt, each cut after the stop token (a batch pads rows that stopped early), and scores."""
    inputs = {k: paddle.to_tensor(v) for k, v in fam.generation_inputs(tok, prompts).items()}
    ids, scores = model.generate(**inputs, max_new_tokens=5, decode_strategy="greedy_search")
    stop = fam.stop_token_id(tok)
    rows = [row[: row.index(stop) + 1] if stop in row else row for row in ids.numpy().tolist()]
    return rows, scores.numpy().reshape(-1)


def assert_batched_generation_matches_single(fam, tok, model):
    prompts = [
        fam.generation_prompt(tok, ["spell: 7 2"], [], 64),
        fam.generation_prompt(tok, ["Question: what is the capital of France? Answer in one short line."], [], 64),
    ]
    assert len(prompts[0]) + 5 < len(prompts[1])  # the first prompt gets real left padding
    rows, scores = generate(fam, tok, model, prompts)
    for row, prompt in enumerate(prompts):
        one_rows, one_scores = generate(fam, tok, model, [prompt])
        assert rows[row] == one_rows[0] and len(rows[row]) > 0
        np.testing.assert_allclose(scores[row], one_scores[0], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_generation_equals_single(tiny_dir, name):
    fam, tok, model = load(tiny_dir, name)
    assert_batched_generation_matches_single(fam, tok, model)


# ---------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_tuning_trains_only_the_prefix(tiny_dir, name):
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    fam, tok, model = load(tiny_dir, name)
    assert fam.supports["prefix"]
    e1, e2 = examples(fam, tok)
    pad = tok.pad_token_id
    rows_list = [[[e1], [e2]]] + ([[[e1, e2], [e2]]] if fam.supports["intokens"] else [])
    base_losses = [float(forward(model, fam.build_batch(rows, pad))[0]) for rows in rows_list]

    paddle.seed(1)
    config = PrefixConfig(num_prefix_tokens=4, **fam.prefix_config_kwargs(model.config))
    prefix_model = PrefixModelForCausalLM(model, config, *fam.prefix_hooks())
    prefix_model.train()
    for rows, base_loss in zip(rows_list, base_losses):
        loss, _ = forward(prefix_model, fam.build_batch(rows, pad))
        assert np.isfinite(float(loss))
        assert abs(float(loss) - base_loss) > 1e-6  # the prefix is really attended to
        loss.backward()
        prefix_grads = [p.grad for p in prefix_model.prefix_encoder.parameters()]
        assert prefix_grads and all(g is not None and float(g.abs().max()) > 0 for g in prefix_grads)
        assert all(p.grad is None for p in model.parameters())
        prefix_model.clear_gradients()

    prefix_model.eval()
    assert_batched_generation_matches_single(fam, tok, prefix_model)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_on_every_linear(tiny_dir, name):
    from paddlenlp.peft import LoRAConfig, LoRAModel

    fam, tok, model = load(tiny_dir, name)
    e1, e2 = examples(fam, tok)
    batch = fam.build_batch([[e1], [e2]], tok.pad_token_id)
    base_loss, _ = forward(model, batch)

    targets = fam.lora_target_modules or [
        re.escape(n) for n, l in model.named_sublayers() if isinstance(l, paddle.nn.Linear)
    ]
    paddle.seed(1)
    lora = LoRAModel(model, LoRAConfig(target_modules=targets, r=4, lora_alpha=8))
    lora.train()
    loss, _ = forward(lora, batch)
    # lora_B starts at zero, so the adapted model starts exactly at the base model.
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-6)
    loss.backward()
    trainable = {n: p for n, p in lora.named_parameters() if not p.stop_gradient}
    assert trainable and all("lora_" in n for n in trainable)
    assert len([n for n in trainable if "lora_B" in n]) == len(targets)
    assert all(float(p.grad.abs().max()) > 0 for n, p in trainable.items() if "lora_B" in n)
