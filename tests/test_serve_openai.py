"""The OpenAI-compatible API beyond chat: POST /v1/completions (text and token-id prompts, streaming, echo and
log-probabilities checked against the model's own log-softmax), the vLLM-style tokenizer endpoints, n choices,
chat log-probabilities, 400s in OpenAI's error shape, and lm-evaluation-harness scoring a served tiny model.
One server process serves every test of this module; the official `openai` client drives it."""
import glob
import json
import math
import os
import sys

import numpy as np
import pytest
import requests

from conftest import ROOT, run_cmd
from test_serve import api_server, sse_events

MAX_LENGTH = 24
MAX_LOGPROBS = 5


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    srv = api_server(llama, tmp_path_factory.mktemp("serve_openai") / "server.log", MAX_LENGTH,
                     "--max_logprobs", str(MAX_LOGPROBS), "--batch_wait_ms", "20", "--model_name", "tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")  # in the test extras
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class Direct:
    """The served model loaded in the test process: log-softmax over a whole sequence, greedy generation."""

    def __init__(self, path):
        from paddlellm.loading import load_for_inference

        self.model, self.tok, self.family, _ = load_for_inference(path)

    def encode(self, text, special=False):
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def log_softmax(self, ids):
        """[len(ids), vocab]: row i is the distribution of the token after ids[:i+1] (one plain forward pass)."""
        import paddle
        import paddle.nn.functional as F

        from paddlellm.families.base import logits_of

        with paddle.no_grad():
            logits = logits_of(self.model(input_ids=paddle.to_tensor([ids])))
        return F.log_softmax(logits.astype("float32"), axis=-1).numpy()[0]

    def token_logprobs(self, ids):
        lsm = self.log_softmax(ids)
        return [float(lsm[i - 1, ids[i]]) for i in range(1, len(ids))]

    def greedy(self, prompt, max_new):
        from paddlellm.generation import generate_ids

        return generate_ids(self.model, self.tok, self.family, [prompt], max_new)[0]


@pytest.fixture(scope="module")
def direct(llama):
    return Direct(llama)


def close(a, b, tol=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_completions_plain_and_streamed(server, client, direct):
    prompt = "spell: 1 2"
    ids = direct.encode(prompt, special=True)  # a text prompt gets the tokenizer's special tokens (<s>), as vLLM does
    reply = direct.greedy(ids, 10)
    want = direct.tok.decode(ids + reply, skip_special_tokens=True)[len(direct.tok.decode(ids, skip_special_tokens=True)):]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == want and out.choices[0].logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(reply))
    assert out.choices[0].finish_reason == ("length" if len(reply) == 10 else "stop")

    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 1
    with server.post("/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True, "echo": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt + want  # echo: the prompt comes first
    assert chunks[-1]["choices"][0]["finish_reason"] == out.choices[0].finish_reason and chunks[-1]["usage"]["completion_tokens"] == len(reply)


def test_echo_logprobs_equal_the_models_log_softmax(server, client, direct):
    """Prompt and generated log-probabilities of text and token-id prompts are the log-softmax of the model's
    logits (a plain forward pass here), in OpenAI's shape; the first prompt token has none."""
    text_ids = direct.encode("spell: 4 5", special=True)
    id_prompts = [direct.encode("hello there"), direct.encode("spell: 6 7 8")]  # no <s>: token ids are taken as given
    out = client.completions.create(model="tiny", prompt="spell: 4 5", max_tokens=4, temperature=0, echo=True, logprobs=3)
    outs = client.completions.create(model="tiny", prompt=id_prompts, max_tokens=4, temperature=0, echo=True, logprobs=3)
    assert [c.index for c in outs.choices] == [0, 1]
    for prompt, choice in [(text_ids, out.choices[0])] + list(zip(id_prompts, outs.choices)):
        lp = choice.logprobs
        reply = direct.greedy(prompt, 4)
        seq = prompt + reply
        n = len(seq)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert close(lp.token_logprobs[1:], direct.token_logprobs(seq))
        lsm = direct.log_softmax(seq)
        for i in range(1, n):
            top = lp.top_logprobs[i]
            assert 3 <= len(top) <= 4 and lp.token_logprobs[i] in top.values()  # the 3 best, plus the chosen token
            assert abs(max(top.values()) - lsm[i - 1].max()) < 1e-4
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
        completion = direct.tok.decode(seq, skip_special_tokens=True)[len(direct.tok.decode(prompt, skip_special_tokens=True)):]
        assert choice.text.endswith(completion)
    assert out.choices[0].text.startswith("spell: 4 5")  # echo: the prompt as sent, then the completion
    assert outs.choices[1].text.startswith(direct.tok.decode(id_prompts[1]))

    # max_tokens 0 with echo: only the prompt is scored (what evaluation harnesses send)
    zero = client.completions.create(model="tiny", prompt=id_prompts[0], max_tokens=0, echo=True, logprobs=0)
    lp = zero.choices[0].logprobs
    assert close(lp.token_logprobs[1:], direct.token_logprobs(id_prompts[0])) and zero.usage.completion_tokens == 0
    assert zero.choices[0].finish_reason == "length" and all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_streamed_logprobs_equal_the_whole_response(server, direct):
    """A stream sends each piece's token logprobs with it (the prompt's with the echo): joined, they are the
    non-streamed response's, for completions and chat."""
    body = {"prompt": "spell: 3 1", "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 2}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    with server.post("/v1/completions", {**body, "stream": True}, stream=True) as r:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(r) if e != "[DONE]"]
    joined = {k: sum((c["logprobs"][k] for c in chunks if c["logprobs"]), []) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    want = whole["logprobs"]
    assert (joined["tokens"], joined["text_offset"]) == (want["tokens"], want["text_offset"]) and "".join(c["text"] for c in chunks) == whole["text"]
    assert joined["token_logprobs"][0] is None and close(joined["token_logprobs"][1:], want["token_logprobs"][1:])
    assert [sorted(t) for t in joined["top_logprobs"][1:]] == [sorted(t) for t in want["top_logprobs"][1:]]
    assert chunks[0]["text"] == "spell: 3 1" and len(chunks[0]["logprobs"]["tokens"]) == len(direct.encode("spell: 3 1", special=True))

    chat = {"messages": [{"role": "user", "content": "spell: 3 1"}], "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    whole = server.post("/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    with server.post("/v1/chat/completions", {**chat, "stream": True}, stream=True) as r:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(r) if e != "[DONE]"]
    joined = sum((c["logprobs"]["content"] for c in chunks if c["logprobs"]), [])
    assert [c["token"] for c in joined] == [c["token"] for c in whole] and close([c["logprob"] for c in joined], [c["logprob"] for c in whole])


def test_logprobs_are_the_raw_distribution_under_sampling(server, client, direct):
    """With temperature, top_p and a repetition penalty the reported logprobs are still the model's own:
    the best alternatives of the first generated token are the top of the plain log-softmax."""
    ids = direct.encode("spell: 9", special=True)
    lsm = direct.log_softmax(ids)[-1]
    best = np.sort(lsm)[::-1][:MAX_LOGPROBS]
    r = server.post("/v1/completions", {"prompt": "spell: 9", "max_tokens": 3, "temperature": 0.5, "top_p": 0.8, "seed": 11,
                                        "repetition_penalty": 1.5, "logprobs": MAX_LOGPROBS})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    got = sorted(lp["top_logprobs"][0].values(), reverse=True)[:MAX_LOGPROBS]
    scaled = np.sort(lsm / 0.5 - np.log(np.exp(lsm / 0.5).sum()))[::-1][:MAX_LOGPROBS]
    assert close(got, list(best)) and not close(got, list(scaled))


def test_tokenize_detokenize_and_tokenizer_info(server, direct):
    text = "spell: 3 1 and hello"
    r = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == direct.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    with_bos = server.post("/tokenize", {"prompt": text}).json()["tokens"]
    assert with_bos == [direct.tok.bos_token_id] + r["tokens"]
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": text}
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (direct.tok.eos_token, direct.tok.bos_token, direct.tok.pad_token)
    assert "chat_template" in info and info["model_max_length"] == r["max_model_len"]


def test_n_choices_and_chat_logprobs(server, client, direct):
    body = dict(model="tiny", prompt="spell: 5", max_tokens=8, temperature=1.0, seed=5, n=2)
    first = client.completions.create(**body)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in client.completions.create(**body).choices] == [c.text for c in first.choices]  # seeded: reproducible
    assert first.usage.prompt_tokens == len(direct.encode("spell: 5", special=True))  # the prompt counts once
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**body, stream=True):  # streamed: pieces of both choices, interleaved
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in first.choices]

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "spell: 2"}], n=2, temperature=1.0, max_tokens=6)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)

    prompt = direct.family.generation_prompt(direct.tok, ["spell: 7"], [], 64)
    reply = direct.greedy(prompt, 8)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "spell: 7"}], temperature=0, max_tokens=8,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == len(reply) == out.usage.completion_tokens
    assert close([c.logprob for c in content], direct.token_logprobs(prompt + reply)[len(prompt) - 1:])
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 and bytes(c.bytes).decode() == c.token for c in content)


BAD = [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens must be >= 0", "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens 0 needs echo", "max_tokens"),
    ({"prompt": "a", "logprobs": MAX_LOGPROBS + 1}, f"logprobs {MAX_LOGPROBS + 1} exceeds this server's limit of {MAX_LOGPROBS}", "logprobs"),
    ({"prompt": [[5, 600]]}, "prompt token id 600 is outside the vocabulary (0..599)", "prompt"),
    ({"prompt": [3, -1]}, "prompt token id -1 is outside the vocabulary", "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt must be a string, a list of strings", "prompt"),
    ({"prompt": []}, "prompt must be a string", "prompt"),
    ({"prompt": "a", "max_tokens": MAX_LENGTH + 1}, f"exceeds this server's limit of {MAX_LENGTH} new tokens", "max_tokens"),
    ({"prompt": "a " * 70}, "above this server's limit of 64 (--src_length)", "prompt"),
    ({"prompt": "a", "n": 0}, "n must be >= 1", "n"),
    ({"prompt": "a", "best_of": 3}, "best_of is not supported", "best_of"),
    ({"prompt": "a", "echo": "yes"}, "echo must be true or false", "echo"),
]


@pytest.mark.parametrize("body, message, param", BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_completions_answer_400_in_openais_error_shape(server, body, message, param):
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == 400


def test_bad_values_through_the_openai_client(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[[1, 10**6]], max_tokens=1)
    assert "outside the vocabulary" in str(e.value)
    for path, body in (("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [1, 10**6]}), ("/detokenize", {"tokens": "a"})):
        r = server.post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "tokens"), r.text


# =========================================================================== lm-evaluation-harness
TASK_DIR = os.path.join(ROOT, "tests", "fixtures", "lm_eval")


def lm_eval_pair(direct, context, continuation):
    """The token ids lm-evaluation-harness sends for (context, continuation) with a remote tokenizer, and the
    context length: trailing spaces of the context move to the continuation; no special tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = direct.encode(context + continuation), direct.encode(context)
    return whole, len(ctx)


def test_lm_eval_scores_the_served_model(server, direct, tmp_path):
    """`lm_eval run --model local-completions` (remote tokenizer, token-id requests) on a local multiple-choice
    task: its per-choice log-likelihoods and its accuracy equal those computed here from the model directly."""
    pytest.importorskip("lm_eval")
    out_dir = tmp_path / "lm_eval"
    run_cmd([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "run", "--model", "local-completions", "--model_args",
             f"base_url={server.url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,model=tiny,max_length=64",
             "--tasks", "paddlellm_tiny_mc", "--include_path", TASK_DIR, "--output_path", str(out_dir), "--log_samples"],
            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    results = json.load(open(glob.glob(str(out_dir / "*" / "results_*.json"))[0]))["results"]["paddlellm_tiny_mc"]
    samples = [json.loads(line) for line in open(glob.glob(str(out_dir / "*" / "samples_paddlellm_tiny_mc_*.jsonl"))[0])]
    docs = [json.loads(line) for line in open(os.path.join(TASK_DIR, "tiny_mc.jsonl"))]
    assert len(samples) == len(docs) == 8
    correct = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        ours = []
        for choice in doc["choices"]:
            ids, ctxlen = lm_eval_pair(direct, doc["question"] + " ->", " " + choice)
            ours.append(sum(direct.token_logprobs(ids)[ctxlen - 1:]))
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert close(theirs, ours), (doc, theirs, ours)
        correct += int(np.argmax(ours)) == doc["answer"]
    assert math.isclose(results["acc,none"], correct / len(docs))
