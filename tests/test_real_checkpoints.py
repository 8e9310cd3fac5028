"""The shapes of today's real checkpoints (issue 20), against references made by transformers
(tests/fixtures/make_hf_fixtures.py): a LLaMA with a BPE tokenizer.json only (no tokenizer.model), grouped-query
attention, tied embeddings, a ChatML chat template and a generation_config eos list (llama-chat; llama-chat-bos
adds a BOS as Llama 3 does), and llama3 / linear rope scaling (llama-rope). Token ids, logits, the label mask
of chat-template examples, greedy chat replies through predict and the server, LoRA -> merge -> export-hf, and
every command on a tiny model of the same shape (paddlellm tiny --tokenizer_format json --chat_template chatml)."""
import json
import os
import sys

import numpy as np
import pytest
import requests

from conftest import ROOT, run_cmd

HF = os.path.join(ROOT, "tests", "fixtures", "hf")
CHAT = ["llama-chat", "llama-chat-bos"]
IGNORE = -100


def fixture(name):
    return os.path.join(HF, name)


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def raw_logits(model, ids):
    import paddle

    from paddlellm.families.base import logits_of

    with paddle.no_grad():
        return logits_of(model(input_ids=paddle.to_tensor(ids))).numpy()


def conversation(messages):
    """(system, user turns, assistant replies) of a chat.json conversation."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    return (system, [m["content"] for m in messages if m["role"] == "user"],
            [m["content"] for m in messages if m["role"] == "assistant"])


@pytest.fixture(scope="module")
def llama_family():
    from paddlellm.families import get_family

    return get_family("llama")


# --------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("name", CHAT)
def test_tokenizer_json_ids_equal_transformers(name, llama_family):
    """CJK, tabs, double spaces, emoji, special tokens written in the text: the ids and texts transformers gives,
    with and without special tokens (llama-chat adds no BOS; llama-chat-bos adds <|begin_of_text|>)."""
    folder = fixture(name)
    assert not os.path.exists(os.path.join(folder, "tokenizer.model"))
    tok = llama_family.load_tokenizer(folder)
    ref = load_json(os.path.join(folder, "tokens.json"))
    assert type(tok).__name__ == "LlamaTokenizerFast"
    for text, ids, ids_special, dec, dec_skip in zip(ref["texts"], ref["ids"], ref["ids_special"], ref["decoded_special"],
                                                     ref["decoded_skip_special"]):
        assert list(tok(text, add_special_tokens=False)["input_ids"]) == ids, text
        assert list(tok(text)["input_ids"]) == ids_special, text
        assert tok.decode(ids_special) == dec
        assert tok.decode(ids_special, skip_special_tokens=True) == dec_skip
    assert (ref["ids_special"][0][0] == tok.bos_token_id) == (name == "llama-chat-bos")
    assert llama_family.stop_token_ids(tok) == [2, 0]  # <|im_end|>, then generation_config.json's other eos id


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name", ["llama-chat", "llama-rope/llama3", "llama-rope/linear"])
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_logits_equal_transformers_with_cpu_kernels_on_and_off(name, kernels, llama_family, monkeypatch):
    """GQA 4/2 + tied embeddings, and rope scaling of type llama3 and linear: transformers' logits within 1e-4,
    with paddlellm's CPU kernels (their own rotary tables) and without; the scaling matters (the unscaled
    model's logits are far)."""
    from paddlellm.cpu_kernels import apply

    monkeypatch.setenv("PADDLELLM_CPU_KERNELS", kernels)
    folder = fixture(name)
    model = apply(llama_family, llama_family.load_model(folder))
    ids = np.load(os.path.join(folder, "input_ids.npy"))
    got = raw_logits(model, ids)
    assert np.abs(got - np.load(os.path.join(folder, "logits.npy"))).max() < 1e-4
    if name.startswith("llama-rope"):
        assert np.abs(got - np.load(os.path.join(folder, "logits_unscaled.npy"))).max() > 1e-2
        # decoding with the CPU decode runner (its own rotary tables) gives generate()'s tokens too
        if kernels == "1":
            assert llama_family.decode_runner(model) is not None  # the scaled tables are read through the rotary module
        from paddlellm.generation import generate_batch
        import paddle

        inputs = {"input_ids": paddle.to_tensor(ids[:1, :40]), "attention_mask": paddle.ones([1, 40], dtype="int64"),
                  "position_ids": paddle.arange(40, dtype="int64")[None]}
        own = generate_batch(model, llama_family, inputs, 8, eos_token_id=-1, pad_token_id=0, own_loop=True).numpy()
        lib = generate_batch(model, llama_family, inputs, 8, eos_token_id=-1, pad_token_id=0, own_loop=False).numpy()
        assert own.tolist() == lib.tolist()


@pytest.mark.parametrize("rope, word", [({"rope_type": "yarn", "factor": 4.0}, "'yarn'"),
                                        ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
                                        ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor")])
def test_unsupported_rope_is_refused_in_one_line(rope, word, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(fixture("llama-rope/llama3"), folder)
    cfg = load_json(folder / "config.json")
    cfg["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"src": "hi"}) + "\n")
    proc = run_cmd([sys.executable, "predict_generation.py", "--model_name_or_path", str(folder), "--data_file", str(data),
                    "--output_file", str(tmp_path / "out.json")], check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "rope" in lines[0] and word in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.json").exists()


# --------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("name", CHAT)
def test_chat_template_prompts_and_label_mask_exact(name, llama_family):
    """Every conversation's generation prompt is transformers' apply_chat_template(add_generation_prompt=True)
    ids; a training example's ids are the full conversation's, and exactly the assistant replies with their
    <|im_end|> are supervised (the newline after it and every prompt, system message included, are not)."""
    folder = fixture(name)
    tok = llama_family.load_tokenizer(folder)
    chat = load_json(os.path.join(folder, "chat.json"))
    gen_prompt = chat["conversations"][0]["prompt_ids"][-7:]  # "<|im_start|>assistant\n"
    for c in chat["conversations"]:
        system, users, replies = conversation(c["messages"])
        assert llama_family.generation_prompt(tok, users, replies[:-1], 1000, system=system) == c["prompt_ids"]
        if system is None:
            ex = llama_family.encode(tok, users, replies, 1000, 1000)
        else:
            ex = llama_family._encode_with_template(tok, users, replies, 1000, 1000, system)
        full = c["full_ids"]
        ids = ex.input_ids + [ex.labels[-1]]
        # all but the template's newline after the final <|im_end|> (it only ever predicts the next turn)
        assert ids == full[: len(ids)] and full[len(ids):] == tok("\n", add_special_tokens=False)["input_ids"]
        # expected mask, from the ids alone: after each "<|im_start|>assistant\n", up to and including <|im_end|> (2)
        want, i = [False] * len(full), 0
        while i < len(full):
            if full[i:i + len(gen_prompt)] == gen_prompt:
                j = i + len(gen_prompt)
                while full[j] != 2:
                    want[j], j = True, j + 1
                want[j] = True
                i = j
            i += 1
        got = [False] + [l != IGNORE for l in ex.labels]
        assert got == want[: len(got)]
        assert [l for l in ex.labels if l != IGNORE] == [t for t, w in zip(full, want) if w]
        assert sum(want) == sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies)


def test_chat_template_truncation_keeps_the_system_message(llama_family):
    """src_length drops the oldest whole turns first, re-rendered so the system message stays; tgt_length cuts
    the final reply (which then has no end-of-turn token)."""
    tok = llama_family.load_tokenizer(fixture("llama-chat"))
    users, replies = ["spell: 3", "spell: 5 2", "spell: 8 0 6"], ["three", "five two", "eight zero six"]
    system = "You spell digits as words."
    whole = llama_family._encode_with_template(tok, users, replies, 1000, 1000, system)
    last = llama_family.generation_prompt(tok, users[2:], [], 1000, system=system)
    cut = llama_family._encode_with_template(tok, users, replies, len(last), 3, system)
    assert cut.truncated and not whole.truncated
    assert cut.input_ids[: len(last)] == last  # only the final turn left, under its system message
    assert [l for l in cut.labels if l != IGNORE] == tok("eight zero six", add_special_tokens=False)["input_ids"][:3]
    assert llama_family.generation_prompt(tok, users, replies[:2], len(last), system=system) == last


def test_chat_template_choice_none_and_file(tmp_path, llama_family):
    """--chat_template none: the family's own format; a file: that template; a template that does not render
    prefix-stable is refused in one line."""
    from paddlellm.arguments import UserError

    folder = fixture("llama-chat")
    own = llama_family.load_tokenizer(folder, chat_template="none")
    assert llama_family.generation_prompt(own, ["hi"], [], 100) == own("hi", add_special_tokens=False)["input_ids"]
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = llama_family.load_tokenizer(folder, chat_template=str(f))
    assert tok.decode(llama_family.generation_prompt(tok, ["hi"], [], 100)) == "[user] hi<|im_end|>[assistant] "
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}")
    tok = llama_family.load_tokenizer(folder, chat_template=str(bad))
    with pytest.raises(UserError, match="extend each other"):
        llama_family.encode(tok, ["a", "b"], ["c", "d"], 100, 100)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", CHAT)
def test_greedy_chat_replies_equal_transformers_generate(name, tmp_path):
    """predict_generation.py (conversations with history) and in-process generation, the decode loop and
    generate(): transformers' greedy replies, stopped at the eos list."""
    from paddlellm.generation import generate_ids
    from paddlellm.loading import load_for_inference

    folder = fixture(name)
    chat = load_json(os.path.join(folder, "chat.json"))
    model, tok, fam, _ = load_for_inference(folder)
    prompts = [c["prompt_ids"] for c in chat["conversations"]]
    want = [c["generate"][:-1] if c["generate"][-1] in (2, 0) else c["generate"] for c in chat["conversations"]]
    for own in (True, False):
        assert generate_ids(model, tok, fam, prompts, 12, own_loop=own) == want
    rows = [c for c in chat["conversations"] if c["messages"][0]["role"] != "system"]
    data = tmp_path / "in.json"
    with open(data, "w") as f:
        for c in rows:
            _, users, replies = conversation(c["messages"])
            f.write(json.dumps({"src": users, "tgt": replies[:-1]} if len(users) > 1 else {"src": users[0]}) + "\n")
    out = tmp_path / "out.json"
    run_cmd([sys.executable, "predict_generation.py", "--model_name_or_path", folder, "--data_file", str(data),
        "--output_file", str(out), "--tgt_length", "12", "--src_length", "128"])
    got = [json.loads(l)["output"] for l in out.read_text().splitlines()]
    assert got == [c["generate_text"].replace("<|im_end|>", "").strip() for c in rows]


def test_openai_chat_endpoint_replies_equal_transformers_generate(tmp_path):
    """The server's /v1/chat/completions (system messages included) answers with transformers' greedy replies."""
    from test_serve import api_server

    folder = fixture("llama-chat")
    chat = load_json(os.path.join(folder, "chat.json"))
    srv = api_server(folder, tmp_path / "server.log", 12, "--src_length", "128")
    try:
        for c in chat["conversations"]:
            r = requests.post(srv.url + "/v1/chat/completions", json={"messages": c["messages"][:-1], "temperature": 0,
                                                                       "max_tokens": 12}, timeout=120)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == c["generate_text"].replace("<|im_end|>", "").strip()
            assert choice["finish_reason"] == "stop"
            assert r.json()["usage"]["prompt_tokens"] == len(c["prompt_ids"])
    finally:
        srv.stop()


# --------------------------------------------------------------------------- LoRA -> merge -> export-hf
def test_lora_on_chat_template_checkpoint_merges_and_exports_back(tmp_path):
    """LoRA fine-tuning on chat-template data of the tokenizer.json-only checkpoint; the output keeps the
    template and stop tokens; merge_lora_params.py --output_format hf and export-hf write folders whose logits
    equal base + adapters (1e-5), whose tokenizer gives the same ids, and whose tokenizer.json keeps the source's
    post-processor and added tokens."""
    from paddlellm.loading import load_for_inference

    base = fixture("llama-chat-bos")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"src": ["spell: 3", "spell: 5 2"], "tgt": ["three", "five two"]}, {"src": "spell: 4 0 7", "tgt": "four zero seven"},
            {"src": "spell: 9 1", "tgt": "nine one"}, {"src": "spell: 6", "tgt": "six"}]
    for split in ("train", "dev"):
        (data / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ft = str(tmp_path / "lora")
    run_cmd([sys.executable, "finetune_generation.py", "--model_name_or_path", base, "--dataset_name_or_path", str(data),
                    "--output_dir", ft, "--lora", "true", "--lora_rank", "4", "--learning_rate", "5e-2",
                    "--per_device_train_batch_size", "4", "--max_steps", "3", "--evaluation_strategy", "no", "--save_strategy", "no",
                    "--disable_tqdm", "true", "--src_length", "48", "--tgt_length", "8", "--seed", "1", "--logging_steps", "1"])
    assert open(os.path.join(ft, "chat_template.jinja")).read() == open(os.path.join(base, "chat_template.jinja")).read()
    assert load_json(os.path.join(ft, "paddlellm_meta.json"))["chat_template"].endswith("chat_template.jinja")
    merged, exported = str(tmp_path / "merged"), str(tmp_path / "exported")
    run_cmd([sys.executable, "merge_lora_params.py", "--lora_path", ft, "--merge_model_path", merged, "--output_format", "hf"])
    run_cmd([sys.executable, "-m", "paddlellm.cli", "export-hf", "--model_name_or_path", ft, "--output_path", exported])
    ids = np.load(os.path.join(base, "input_ids.npy"))
    adapted, tok, fam, _ = load_for_inference(ft)
    want = raw_logits(adapted, ids)
    assert np.abs(want - np.load(os.path.join(base, "logits.npy"))).max() > 1e-3  # the adapters changed the model
    texts = load_json(os.path.join(base, "tokens.json"))["texts"]
    src_tok = load_json(os.path.join(base, "tokenizer.json"))
    chat = load_json(os.path.join(base, "chat.json"))["conversations"][2]
    _, users, replies = conversation(chat["messages"])
    for folder in (merged, exported):
        assert not os.path.exists(os.path.join(folder, "tokenizer.model"))
        model, tok2, fam2, _ = load_for_inference(folder)
        assert np.abs(raw_logits(model, ids) - want).max() < 1e-5
        assert [tok2(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
        assert fam2.generation_prompt(tok2, users, replies[:-1], 1000) == chat["prompt_ids"]
        assert fam2.stop_token_ids(tok2) == [2, 0]
        written = load_json(os.path.join(folder, "tokenizer.json"))
        assert written["post_processor"] == src_tok["post_processor"] and written["added_tokens"] == src_tok["added_tokens"]
        cfg = load_json(os.path.join(folder, "tokenizer_config.json"))
        assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|im_end|>"
        assert cfg["chat_template"] == open(os.path.join(base, "chat_template.jinja")).read()
        assert load_json(os.path.join(folder, "generation_config.json"))["eos_token_id"] == [2, 0]


# --------------------------------------------------------------------------- every command on a tiny model of this shape
@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_chat") / "m")
    run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "llama", "--output", out, "--tokenizer_format", "json",
        "--chat_template", "chatml", "--num_key_value_heads", "2", "--tie_word_embeddings", "true"])
    return out


def test_tiny_has_the_shape_of_a_real_checkpoint(tiny_chat, llama_family):
    from paddlellm.loading import load_for_inference

    assert sorted(n for n in os.listdir(tiny_chat) if n.startswith("tok") or n.startswith("chat")) == \
        ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    cfg = load_json(os.path.join(tiny_chat, "config.json"))
    assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4 and cfg["tie_word_embeddings"] is True
    model, tok, fam, _ = load_for_inference(tiny_chat)
    assert type(tok).__name__ == "LlamaTokenizerFast" and tok.eos_token == "<|im_end|>"
    prompt = fam.generation_prompt(tok, ["spell: 4"], [], 100)
    assert tok.decode(prompt) == "<|im_start|>user\nspell: 4<|im_end|>\n<|im_start|>assistant\n"
    assert np.array_equal(model.lm_head.weight.numpy(), model.llama.embed_tokens.weight.numpy().T) or \
        np.array_equal(model.lm_head.weight.numpy(), model.llama.embed_tokens.weight.numpy())


def test_every_command_on_a_tokenizer_json_chat_model(tiny_chat, tmp_path):
    """SFT, predict, quant, static export (the in-place program, format 3; and predict on it), serve's chat and prepare-pretrain on a tiny model
    with a tokenizer.json only, a ChatML template, GQA and tied embeddings: each output keeps the template."""
    from paddlellm.cli import run_command
    from paddlellm.loading import load_for_inference

    def run(command, *argv):  # in this process, as the scripts call it (paddle's import paid once)
        assert run_command(command, list(argv)) == 0

    sft = str(tmp_path / "sft")
    run("finetune", "--model_name_or_path", tiny_chat, "--dataset_name_or_path", os.path.join(ROOT, "data"),
        "--output_dir", sft, "--max_steps", "2", "--per_device_train_batch_size", "4", "--evaluation_strategy", "no",
        "--save_strategy", "no", "--disable_tqdm", "true", "--src_length", "32", "--tgt_length", "8")
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"src": ["spell: 1", "spell: 2"], "tgt": ["one"]}) + "\n")
    outs = {}
    quant = str(tmp_path / "quant")
    run("quant", "--model_name_or_path", sft, "--output_dir", quant, "--do_ptq", "--quant_type", "WINT8",
        "--ptq_step", "1", "--dataset_name_or_path", os.path.join(ROOT, "data"), "--src_length", "32", "--tgt_length", "8",
        "--do_eval", "false")
    static = str(tmp_path / "static")
    run("export", "--model_name_or_path", sft, "--output_path", static)
    assert load_json(os.path.join(static, "static_meta.json"))["format_version"] == 3  # the in-place step program
    for name, folder in (("sft", sft), ("quant", quant), ("static", static)):
        assert os.path.isfile(os.path.join(folder, "chat_template.jinja")), name
        out = tmp_path / f"{name}.out"
        run("predict", "--model_name_or_path", folder, "--data_file", str(data), "--output_file", str(out),
            "--tgt_length", "6", "--src_length", "64")
        outs[name] = json.loads(out.read_text())["output"]
    from paddlellm.generation import decode, generate_ids

    model, tok, fam, _ = load_for_inference(sft)
    prompt = fam.generation_prompt(tok, ["spell: 1", "spell: 2"], ["one"], 64)
    assert tok.decode(prompt).startswith("<|im_start|>user\nspell: 1<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n")
    assert outs["sft"] == outs["static"] == decode(tok, generate_ids(model, tok, fam, [prompt], 6)[0])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("spell one two three\n\nfour five six\n")
    run("prepare-pretrain", "--model_name_or_path", tiny_chat, "--input_path", str(corpus),
        "--output_prefix", str(tmp_path / "pt" / "corpus"), "--append_eos")
    assert any(n.endswith(".bin") or n.endswith(".npy") for n in os.listdir(tmp_path / "pt"))


def test_system_message_in_the_family_format_opens_the_first_prompt(llama, llama_family):
    """Without a template a system message is put before the first user message, on a line of its own (as
    the server did before chat templates), and the folder's single eos id is the only stop token."""
    tok = llama_family.load_tokenizer(llama)
    assert llama_family.generation_prompt(tok, ["a", "c"], ["r"], 64, system="be brief") == \
        llama_family.generation_prompt(tok, ["be brief\na", "c"], ["r"], 64)
    assert llama_family.stop_token_ids(tok) == [tok.eos_token_id]


@pytest.mark.parametrize("name, rope", [("llama-rope/llama3", None), ("llama-rope/linear", {"rope_type": "linear", "factor": 2.0})])
def test_rope_scaling_exports_back(name, rope, llama_family, tmp_path):
    """export-hf's writer puts the scaling back in config.json; the folder loads again with the same logits."""
    from paddlellm.formats import hf

    folder = fixture(name)
    model = llama_family.load_model(folder)
    out = tmp_path / "out"
    out.mkdir()
    hf.export_model(llama_family, model, llama_family.load_tokenizer(fixture("llama-chat")), str(out))
    cfg = load_json(out / "config.json")
    want = rope or {k: v for k, v in load_json(os.path.join(folder, "config.json"))["rope_scaling"].items()}
    assert cfg["rope_scaling"] == want
    ids = np.load(os.path.join(folder, "input_ids.npy"))
    assert np.abs(raw_logits(llama_family.load_model(str(out)), ids) - np.load(os.path.join(folder, "logits.npy"))).max() < 1e-4


def test_preference_pairs_follow_the_chat_template(llama_family):
    """DPO's pairs (preference_data.encode_pair) on a chat-template checkpoint: both replies share the template's
    generation prompt, and each supervises exactly its reply and <|im_end|>."""
    from paddlellm.preference_data import PreferenceRecord, encode_pair

    tok = llama_family.load_tokenizer(fixture("llama-chat"))
    rec = PreferenceRecord(["spell: 3", "spell: 5 2"], ["three"], "five two", "seven", "x:1")
    pair = encode_pair(llama_family, tok, rec, 200, 20)
    prompt = llama_family.generation_prompt(tok, rec.src, rec.tgt, 200)
    assert pair.shared == len(prompt) - 1
    for ex, reply in ((pair.chosen, "five two"), (pair.rejected, "seven")):
        assert ex.input_ids[: len(prompt)] == prompt
        want = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert [l for l in ex.labels[pair.shared:] if l != IGNORE] == want
