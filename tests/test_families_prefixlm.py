"""Prefix-LM families (ChatGLM v1, GLM): example layout, masks, loss, packing, generation, PEFT.

Each assertion compares numbers: token ids built from the tokenizer's pieces, paddlenlp's own
reference layouts, logits of packed versus separate rows, batched versus one-by-one generation.
"""
import numpy as np
import pytest

FAMILIES = ["chatglm", "glm"]

# Expected special tokens of each family's chat format.
SPECIAL = {
    "chatglm": dict(bos=[], prompt_end=["[gMASK]", "<sop>"], reply_end=["<eop>"]),
    "glm": dict(
        bos=["[CLS]"], prompt_end=["[gMASK]", "<|endoftext|>", "<|startofpiece|>"], reply_end=["<|endofpiece|>"]
    ),
}

TWO_TURNS = (["spell: 7 2", "spell: 4"], ["seven two", "four"])


@pytest.fixture(scope="module", params=FAMILIES)
def ctx(request, tiny_dir):
    """(family, tokenizer, tiny checkpoint path) for one family."""
    from paddlellm.families import get_family

    family = get_family(request.param)
    path = tiny_dir(request.param)
    return family, family.load_tokenizer(path), path


# ---------------------------------------------------------------------- helpers


def load(ctx, context_sensitive=False, seed=0):
    """A fresh model in eval mode. context_sensitive: redraw the weights with a larger spread.

    The default random init of these tiny models mostly echoes the input token (residual and
    tied embeddings dominate), which would make generation comparisons vacuous.
    """
    family, _, path = ctx
    model = family.load_model(path)
    if context_sensitive:
        rng = np.random.default_rng(seed)
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") else 0.0
            p.set_value((base + rng.normal(0.0, 0.2, p.shape)).astype("float32"))
    model.eval()
    return model


def tensors(batch):
    import paddle

    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def logits_of(model, family, rows, pad_id, seq_len=None):
    batch = family.build_batch(rows, pad_id, seq_len)
    batch.pop("labels")
    batch.pop("loss_mask", None)
    out = model(**tensors(batch))
    out = out[0] if isinstance(out, (tuple, list)) else out.logits
    return out.numpy()


def examples(ctx):
    family, tok, _ = ctx
    return [
        family.encode(tok, *TWO_TURNS, 64, 16),
        family.encode(tok, ["spell: 1 2 3"], ["one two three"], 64, 16),
        family.encode(tok, ["spell: 9"], ["nine"], 64, 16),
    ]


def greedy(model, family, tok, prompts, steps=8):
    """Greedy generation, each sequence cut after its first end-of-reply token."""
    eos = family.reply_end_ids(tok)[-1]
    inputs = tensors(family.generation_inputs(tok, prompts))
    out = model.generate(
        **inputs, max_new_tokens=steps, decode_strategy="greedy_search", eos_token_id=eos, pad_token_id=tok.pad_token_id
    )[0].numpy()
    seqs = []
    for row in out.tolist():
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    return seqs


def teacher_forced_argmax(model, family, tok, prompt, generated):
    """Argmax predictions for `generated` when prompt + generated is run in the training layout."""
    ids = prompt + generated[:-1]
    ex = family.make_example(ids, [0] * len(ids), len(prompt), False)
    logits = logits_of(model, family, [[ex]], tok.pad_token_id)[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist()


def prompts(ctx):
    family, tok, _ = ctx
    return [
        family.generation_prompt(tok, ["spell: 7 2"], [], 64),
        family.generation_prompt(tok, ["spell: 1 2 3 4 5 6", "spell: 4"], ["one two three four five six"], 64),
    ]


# ---------------------------------------------------------------------- tokenizer and layout


def test_tiny_tokenizer_and_config(ctx):
    family, tok, path = ctx
    spec = SPECIAL[family.name]
    assert type(tok).__name__ == family.tokenizer_class
    assert tok.convert_ids_to_tokens(family.bos_ids(tok)) == spec["bos"]
    assert tok.convert_ids_to_tokens(family.prompt_end_ids(tok)) == spec["prompt_end"]
    assert tok.convert_ids_to_tokens(family.reply_end_ids(tok)) == spec["reply_end"]
    special = family.bos_ids(tok) + family.prompt_end_ids(tok) + family.reply_end_ids(tok)
    assert len(set(special)) == len(special) and tok.unk_token_id not in special
    texts = ["spell: 6 0 3 1", "seven two eight", "我们使用飞桨训练大语言模型"]
    if family.name == "chatglm":
        # <n>, <|blank_2|>, <|tab|> pieces (no full-width punctuation: the tiny model's NFKC folds it)
        texts.append("[Round 0]\n问 hello  world\tend")
    for text in texts:
        ids = family.encode_text(tok, text)
        assert tok.decode(ids) == text
        assert not set(ids) & set(special)

    config = family.load_model(path).config
    assert config.vocab_size == len(tok)
    if family.name == "chatglm":
        # the model finds [gMASK] and <sop> through its config when it builds generation inputs
        assert (config.gmask_token_id, config.mask_token_id) == (tok.gmask_token_id, tok.mask_token_id)
        assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    else:
        assert config.eos_token_id == tok.eop_token_id


def expected_two_turn_ids(family, tok):
    """Context and final reply of TWO_TURNS, built here from the tokenizer's pieces."""

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    if family.name == "chatglm":
        context = enc("[Round 0]\n问：spell: 7 2\n答：seven two\n[Round 1]\n问：spell: 4\n答：")
        context += [tok.gmask_token_id, tok.bos_token_id]
        reply = enc("four") + [tok.eos_token_id]
        mask_pos = len(context) - 2
    else:
        context = [tok.cls_token_id] + enc("spell: 7 2") + enc("seven two") + enc("spell: 4")
        context += [tok.gmask_token_id, tok.eos_token_id, tok.sop_token_id]
        reply = enc("four") + [tok.eop_token_id]
        mask_pos = len(context) - 3
    return context, reply, mask_pos


def test_exact_two_turn_example(ctx):
    family, tok, _ = ctx
    context, reply, mask_pos = expected_two_turn_ids(family, tok)
    ex = family.encode(tok, *TWO_TURNS, 64, 16)
    full = context + reply
    sop = len(context) - 1
    assert ex.input_ids == full[:-1]
    assert ex.labels == [-100] * sop + reply  # only the final reply; <sop> predicts its first token
    assert ex.positions == list(range(sop)) + [mask_pos] * len(reply)
    assert ex.block_positions == [0] * sop + list(range(1, len(reply) + 1))
    assert ex.prefix_len == sop
    assert not ex.truncated
    assert family.generation_prompt(tok, TWO_TURNS[0], TWO_TURNS[1][:1], 64) == context

    # Too long a context: the oldest turn goes first, as if there had been no history.
    short = family.encode(tok, *TWO_TURNS, len(context) - 1, 16)
    single = family.encode(tok, TWO_TURNS[0][1:], TWO_TURNS[1][1:], 64, 16)
    assert short.truncated and short.input_ids == single.input_ids and short.positions == single.positions


def test_layout_matches_paddlenlp_reference(ctx):
    """Our ids, positions and mask equal what paddlenlp's own tokenizer builds for one turn."""
    family, tok, _ = ctx
    ex = family.encode(tok, ["spell: 4 5"], ["four five"], 64, 16)
    n = len(ex)
    mask = family.build_batch([[ex]], tok.pad_token_id)["attention_mask"][0, 0].astype("int64")
    prompt = tok("spell: 4 5", add_special_tokens=False)["input_ids"]
    reply = tok("four five", add_special_tokens=False)["input_ids"]
    if family.name == "chatglm":
        full = tok.build_inputs_with_special_tokens(list(prompt), reply)
        ref = tok.pad({"input_ids": full}, padding="max_length", max_length=len(full), return_attention_mask=True)
        ref_pos, ref_mask = np.asarray(ref["position_ids"])[:, :n], np.asarray(ref["attention_mask"])[0, :n, :n]
    else:
        from paddlenlp.transformers.tokenizer_utils_base import BatchEncoding

        context = [tok.cls_token_id] + prompt + [tok.gmask_token_id, tok.eos_token_id]
        ones = np.ones([1, len(context)], "int64")
        model_input = BatchEncoding({"input_ids": np.array([context]), "attention_mask": ones})
        ref = tok.build_inputs_for_generation(model_input, max_gen_length=len(reply) + 2, targets="four five")
        full = ref["input_ids"][0].tolist() + [tok.eop_token_id]
        ref_pos, ref_mask = ref["position_ids"][0][:, :n], ref["attention_mask"][0, 0, :n, :n]
    assert ex.input_ids == full[:-1]
    assert ex.labels[-len(reply) - 1 :] == full[-len(reply) - 1 :]
    np.testing.assert_array_equal(np.stack([ex.positions, ex.block_positions]), ref_pos)
    np.testing.assert_array_equal(mask, ref_mask)


# ---------------------------------------------------------------------- loss and packing


def test_loss_equals_manual_cross_entropy(ctx):
    family, tok, _ = ctx
    model = load(ctx)
    e1, e2, e3 = examples(ctx)
    batch = family.build_batch([[e1], [e2, e3]], tok.pad_token_id, seq_len=max(len(e1), len(e2) + len(e3)) + 5)
    out = model(**tensors(batch), return_dict=True)
    logits = out.logits.numpy().astype("float64")
    labels = batch["labels"]
    keep = labels != -100
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    manual = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep].mean()
    assert np.isfinite(manual)
    np.testing.assert_allclose(float(out.loss), manual, rtol=1e-5)


def test_packed_logits_equal_separate(ctx):
    family, tok, _ = ctx
    model = load(ctx, context_sensitive=True)
    e1, e2, e3 = examples(ctx)
    packed = logits_of(model, family, [[e2, e1], [e3]], tok.pad_token_id, seq_len=len(e1) + len(e2) + 3)
    alone = [logits_of(model, family, [[e]], tok.pad_token_id)[0] for e in (e1, e2, e3)]
    np.testing.assert_allclose(packed[0, : len(e2)], alone[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, len(e2) : len(e2) + len(e1)], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[1, : len(e3)], alone[2], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- generation


def test_batched_generation_equals_single(ctx):
    family, tok, _ = ctx
    model = load(ctx, context_sensitive=True)
    ps = prompts(ctx)
    assert len(ps[0]) != len(ps[1])
    together = greedy(model, family, tok, ps)
    alone = [greedy(model, family, tok, [p])[0] for p in ps]
    assert together == alone
    assert len(set(together[1])) > 1  # the weights really depend on context
    # Generation (cache, left padding) agrees with the training layout token by token.
    for p, g in zip(ps, alone):
        assert teacher_forced_argmax(model, family, tok, p, g) == g


def test_generation_batch_wider_than_prompts(ctx):
    """More prompts than prompt tokens (paddlenlp's GLM would drop batch rows of its memories)."""
    family, tok, _ = ctx
    model = load(ctx, context_sensitive=True)
    ps = [family.generation_prompt(tok, [q], [], 64) for q in ["1", "2", "3", "4", "5", "6", "7", "8 9"]]
    assert len(ps) > max(len(p) for p in ps)
    assert greedy(model, family, tok, ps, steps=4) == [greedy(model, family, tok, [p], steps=4)[0] for p in ps]


# ---------------------------------------------------------------------- PEFT


def test_prefix_tuning(ctx):
    import paddle
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    family, tok, _ = ctx
    model = load(ctx, context_sensitive=True)
    config = PrefixConfig(num_prefix_tokens=3, prefix_projection=False, **family.prefix_config_kwargs(model.config))
    prefix_model = PrefixModelForCausalLM(model, config, *family.prefix_hooks())
    paddle.seed(1)
    for p in prefix_model.prefix_encoder.parameters():
        p.set_value(paddle.randn(p.shape) * 0.5)

    e1, e2, e3 = examples(ctx)
    prefix_model.train()
    out = prefix_model(**tensors(family.build_batch([[e1], [e2, e3]], tok.pad_token_id)))
    loss = out[0] if isinstance(out, (tuple, list)) else out.loss
    assert loss.shape == [] and np.isfinite(float(loss))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in prefix_model.prefix_encoder.parameters()]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)

    prefix_model.eval()
    ps = prompts(ctx)
    together = greedy(prefix_model, family, tok, ps)
    assert together == [greedy(prefix_model, family, tok, [p])[0] for p in ps]
    for p, g in zip(ps, together):
        assert teacher_forced_argmax(prefix_model, family, tok, p, g) == g
    # the prefix changes what the model says
    assert together != greedy(model, family, tok, ps)


def test_lora_forward_backward(ctx):
    from paddlenlp.peft import LoRAConfig, LoRAModel

    family, tok, _ = ctx
    model = load(ctx)
    lora = LoRAModel(model, LoRAConfig(target_modules=family.lora_target_modules, r=4))
    lora.train()
    e1, e2, e3 = examples(ctx)
    out = lora(**tensors(family.build_batch([[e1], [e2, e3]], tok.pad_token_id)))
    loss = out[0] if isinstance(out, (tuple, list)) else out.loss
    assert np.isfinite(float(loss))
    loss.backward()
    trained = {n for n, p in lora.named_parameters() if p.grad is not None}
    n_layers = model.config.num_hidden_layers
    assert len(trained) == 2 * 4 * n_layers  # lora_A and lora_B of 4 Linear layers per block
    assert all("lora_" in n for n in trained)
