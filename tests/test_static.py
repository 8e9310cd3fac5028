"""Static-graph inference (export_model.py, predict/serve --mode static) on tiny models: every exportable family
gives exactly dynamic mode's output files (greedy and seeded sampling, left-padded mixed lengths); the step
program's logits equal the dynamic forward's; the paddle.inference pitfalls (oneDNN, strided inputs) are
guarded; resume, serving, LoRA merge round trip and the one-line refusals."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from conftest import FAMILIES
from paddlellm.families import get_family
from paddlellm.formats.static import INPLACE_VERSION
from test_predict import DATA, make_lora, make_prefix, predict, read_jsonl, write_jsonl

os.environ["PADDLELLM_NO_PROGRESS"] = "1"

EXPORTED = [f for f in FAMILIES if get_family(f).static_export_refusal() is None]
REFUSED = [f for f in FAMILIES if f not in EXPORTED]
INPLACE = ["llama", "qwen2", "gpt-3", "opt", "bloom", "chatglm_v2", "chatglm", "glm"]  # exported as the in-place step program (format 3); the other families as format 1
SAMPLING = ["--top_k", "5", "--top_p", "0.9", "--temperature", "0.8", "--repetition_penalty", "1.2", "--seed", "7"]


def export(*argv):
    from paddlellm.commands.export import main

    return main(list(argv))


@pytest.fixture(scope="session")
def exported(tiny_dir, tmp_path_factory):
    """exported(family) -> a static export of the family's tiny model, made once per session."""
    root = tmp_path_factory.mktemp("static")
    cache = {}

    def get(family):
        if family not in cache:
            out = str(root / family)
            assert export("--model_name_or_path", tiny_dir(family), "--output_path", out, "--src_length", "48", "--tgt_length", "6") == 0
            cache[family] = out
        return cache[family]

    return get


def one_line_error(capsys, call, *argv):
    with pytest.raises(SystemExit) as e:
        call(*argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("paddlellm: CPU runtime", "["))]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def program_inputs(path):
    """{input name: shape} of the data ops of a saved PIR program (model.json); -1 = dynamic."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("#") == "1.data":
                attrs = {a["N"]: a["AT"]["D"] for a in node["A"]}
                found[attrs["name"]] = attrs["shape"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    with open(path, encoding="utf-8") as f:
        walk(json.load(f))
    return found


# ------------------------------------------------------------------ output files equal dynamic mode's
@pytest.mark.parametrize("family", EXPORTED)
def test_predict_static_equals_dynamic(family, tiny_dir, exported, tmp_path):
    folder = exported(family)
    # exactly one weights file: the step program's (a second program would hold a second copy)
    assert [os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.pdiparams"))] == ["model.pdiparams"]
    assert not glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.pdparams"))
    assert json.load(open(os.path.join(folder, "paddlellm_meta.json")))["kind"] == "static"
    assert json.load(open(os.path.join(folder, "static_meta.json")))["format_version"] == (INPLACE_VERSION if family in INPLACE else 1)
    data = write_jsonl(tmp_path / "data.json", DATA)
    for name, extra in (("greedy", ["--top_k", "1"]), ("sampling", SAMPLING)):
        outs = {}
        for mode, model in (("dynamic", tiny_dir(family)), ("static", folder)):
            outs[mode] = str(tmp_path / f"{name}-{mode}.json")
            mode_flag = ["--mode", "static"] if name == "greedy" and mode == "static" else []  # else found from the folder
            assert predict("--model_name_or_path", model, "--data_file", data, "--output_file", outs[mode], "--batch_size", "4",
                           "--src_length", "48", "--tgt_length", "6", *extra, *mode_flag) == 0
        with open(outs["dynamic"], "rb") as a, open(outs["static"], "rb") as b:
            assert a.read() == b.read(), name


# ------------------------------------------------------------------ resume
def test_static_resume_continues_a_journal(exported, tmp_path, monkeypatch):
    import paddlellm.generation as generation

    folder = exported("llama")
    rows = [{"src": f"spell: {' '.join(str(d) for d in range(i % 5 + 1))}"} for i in range(6)]
    data = write_jsonl(tmp_path / "data.json", rows)
    out, full = str(tmp_path / "pred.json"), str(tmp_path / "full.json")
    common = ["--model_name_or_path", folder, "--mode", "static", "--data_file", data, "--batch_size", "2", "--tgt_length", "4"]
    assert predict(*common, "--output_file", full) == 0
    real, calls = generation.generate_ids, []

    def crash_after(n):
        def fake(*a, **k):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*a, **k)
        return fake

    monkeypatch.setattr(generation, "generate_ids", crash_after(1))
    with pytest.raises(SystemExit):
        predict(*common, "--output_file", out)
    assert len(read_jsonl(out + ".partial")) == 1 + 2  # header + one finished batch
    calls.clear()
    monkeypatch.setattr(generation, "generate_ids", crash_after(99))
    assert predict(*common, "--output_file", out, "--resume", "true") == 0
    assert len(calls) == 2 and read_jsonl(out) == read_jsonl(full)


# ------------------------------------------------------------------ data parallel
def test_static_data_parallel_equals_one_process(exported, tmp_path):
    import sys

    from conftest import ROOT, run_cmd

    folder = exported("llama")
    data = write_jsonl(tmp_path / "data.json", [{"src": f"spell: {i} {i + 1}"} for i in range(7)])
    single, out = str(tmp_path / "single.json"), str(tmp_path / "dist.json")
    common = ["--model_name_or_path", folder, "--data_file", data, "--batch_size", "2", "--tgt_length", "4"]
    assert predict(*common, "--output_file", single) == 0
    logs = str(tmp_path / "logs")
    run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
             os.path.join(ROOT, "predict_generation.py"), *common, "--output_file", out, "--device", "cpu"],
            env={"PADDLELLM_NO_PROGRESS": "1"}, timeout=300)
    assert read_jsonl(out) == read_jsonl(single)
    assert "predict: wrote 7 lines" in open(os.path.join(logs, "workerlog.0")).read()


# ------------------------------------------------------------------ LoRA: merged at export == merged first
def test_export_with_lora_equals_export_after_merge(tiny_dir, tmp_path):
    from paddlellm.commands.merge import main_lora

    base = tiny_dir("llama")
    lora = make_lora(base, str(tmp_path / "lora"), "llama", src_length=40, tgt_length=5)
    assert export("--lora_path", lora, "--output_path", str(tmp_path / "st_lora")) == 0
    assert main_lora(["--lora_path", lora, "--merge_model_path", str(tmp_path / "merged")]) == 0
    assert export("--model_name_or_path", str(tmp_path / "merged"), "--output_path", str(tmp_path / "st_merged")) == 0
    data = write_jsonl(tmp_path / "data.json", DATA)
    outs = []
    for name, model in (("st_lora", str(tmp_path / "st_lora")), ("st_merged", str(tmp_path / "st_merged")), ("dyn", None)):
        outs.append(str(tmp_path / f"{name}.json"))
        where = ["--model_name_or_path", model] if model else ["--lora_path", lora]
        assert predict(*where, "--data_file", data, "--output_file", outs[-1], "--batch_size", "3") == 0
    assert read_jsonl(outs[0]) == read_jsonl(outs[1]) == read_jsonl(outs[2])  # and equal to base + adapters, dynamic
    meta = json.load(open(tmp_path / "st_lora" / "static_meta.json"))
    assert meta["source"]["lora_path"] == os.path.abspath(lora)
    assert json.load(open(tmp_path / "st_lora" / "paddlellm_meta.json"))["tgt_length"] == 5  # saved settings carried over


# ------------------------------------------------------------------ prefix tuning: the prefix becomes the initial cache
@pytest.mark.parametrize("family", ["llama", "glm", "qwen2"])  # a key/value cache and GLM's hidden-state memories
def test_export_with_prefix_equals_dynamic_prefix(family, tiny_dir, tmp_path):
    from paddlellm.formats.static import flatten, load_static

    prefix = make_prefix(tiny_dir(family), str(tmp_path / "prefix"), family, src_length=40, tgt_length=5)
    folder = str(tmp_path / "static")
    assert export("--prefix_path", prefix, "--output_path", folder) == 0
    assert sorted(os.listdir(os.path.join(folder, "prefix"))) == ["prefix_config.json", "prefix_model_state.pdparams"]
    data = write_jsonl(tmp_path / "data.json", DATA)
    for name, extra in (("greedy", []), ("sampling", SAMPLING)):
        outs = []
        for where in (["--prefix_path", prefix], ["--model_name_or_path", folder]):
            outs.append(str(tmp_path / f"{name}-{len(outs)}.json"))
            assert predict(*where, "--data_file", data, "--output_file", outs[-1], "--batch_size", "4", *extra) == 0
        with open(outs[0], "rb") as a, open(outs[1], "rb") as b:
            assert a.read() == b.read(), name
    # The prefix reaches the step program as the past of the prompt step (4 prefix tokens).
    from paddlellm.generation import generate_ids

    model, tok = load_static(folder, get_family(family))
    shell, pasts = model.model, []
    forward = shell.forward
    object.__setattr__(shell, "forward", lambda **kw: pasts.append(kw.get(forward.cache_key)) or forward(**kw))
    generate_ids(model, tok, get_family(family), [[5, 6, 7]], 2)
    first = flatten(pasts[0])
    assert first and all(t.shape[forward.cache_shapes[0].index("seq")] == 4 for t in first)


# ------------------------------------------------------------------ one-line refusals
def test_refusals(tiny_dir, exported, tmp_path, capsys):
    base, folder = tiny_dir("llama"), exported("llama")
    capsys.readouterr()
    data = write_jsonl(tmp_path / "data.json", DATA[:1])
    out = str(tmp_path / "o.json")
    assert "paddlenlp_ops" in one_line_error(capsys, export, "--model_name_or_path", base, "--output_path", str(tmp_path / "x"), "--inference_model", "true")
    assert "paddlenlp_ops" in one_line_error(capsys, predict, "--model_name_or_path", base, "--data_file", data, "--output_file", out, "--inference_model", "true")
    assert "float16" in one_line_error(capsys, export, "--model_name_or_path", base, "--output_path", str(tmp_path / "x"), "--dtype", "float16")
    lora = make_lora(base, str(tmp_path / "lora"), "llama")
    capsys.readouterr()
    msg = one_line_error(capsys, predict, "--model_name_or_path", folder, "--lora_path", lora, "--data_file", data, "--output_file", out)
    assert "--lora_path can't be applied to the static export" in msg
    assert "is not a static export" in one_line_error(capsys, predict, "--model_name_or_path", base, "--mode", "static", "--data_file", data, "--output_file", out)
    assert "only with --mode static" in one_line_error(capsys, predict, "--model_name_or_path", folder, "--mode", "dynamic", "--data_file", data, "--output_file", out)
    assert "prefix_config.json" in one_line_error(capsys, export, "--prefix_path", str(tmp_path), "--output_path", str(tmp_path / "x"))
    # an export of another format version: re-export
    old = str(tmp_path / "old")
    shutil.copytree(folder, old)
    meta = json.load(open(os.path.join(old, "static_meta.json")))
    meta["format_version"] = 0
    json.dump(meta, open(os.path.join(old, "static_meta.json"), "w"))
    assert "re-export" in one_line_error(capsys, predict, "--model_name_or_path", old, "--data_file", data, "--output_file", out)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "x")
    for family in REFUSED:
        msg = one_line_error(capsys, export, "--model_name_or_path", tiny_dir(family), "--output_path", str(tmp_path / "x"))
        assert f"the {family} family can't be exported" in msg

    # a static export where weights are needed (fine-tuning, merging): one line, nothing written
    from paddlellm.commands.finetune import main as finetune_main
    from paddlellm.commands.merge import main_lora as merge_main

    finetune = lambda *argv: finetune_main(list(argv))  # noqa: E731
    main_lora = lambda *argv: merge_main(list(argv))  # noqa: E731
    train_dir = tmp_path / "train_data"
    train_dir.mkdir()
    write_jsonl(train_dir / "train.json", DATA[:2])
    static_refusal = f"model_name_or_path {folder!r} is a static-graph export (export_model.py): only predict and serve run it"
    msg = one_line_error(capsys, finetune, "--model_name_or_path", folder, "--dataset_name_or_path", str(train_dir),
                         "--output_dir", str(tmp_path / "ft"), "--max_steps", "1")
    assert msg.startswith(f"error: {static_refusal}")
    lora = make_lora(base, str(tmp_path / "lora2"), "llama")
    capsys.readouterr()
    msg = one_line_error(capsys, main_lora, "--model_name_or_path", folder, "--lora_path", lora, "--merge_model_path", str(tmp_path / "m"))
    assert static_refusal in msg
    assert not os.path.exists(tmp_path / "ft") and not os.path.exists(tmp_path / "m")


# ------------------------------------------------------------------ serving a static folder
def test_serve_static_folder_equals_dynamic(exported, tiny_dir, tmp_path):
    from paddlellm.generation import decode, generate_ids
    from paddlellm.loading import load_for_inference
    from test_serve import Server, sse_events

    model, tok, fam, _ = load_for_inference(tiny_dir("llama"))  # the dynamic model, for the expected replies

    def want(users, bots, max_new):
        return decode(tok, generate_ids(model, tok, fam, [fam.generation_prompt(tok, users, bots, 64)], max_new)[0])

    srv = Server(["--model_name_or_path", exported("llama"), "--ui", "false", "--max_length", "24", "--src_length", "64"], tmp_path / "server.log")
    try:
        r = srv.post("/api/chat", {"context": "spell: 4 5", "history": ["hello", "hi"], "max_length": 16, "top_k": 1})
        assert r.status_code == 200, r.text
        expected = want(["hello", "spell: 4 5"], ["hi"], 16)
        assert expected and r.json()["result"]["response"]["utterance"] == expected
        msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "spell: 6 7 8"}]
        with srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 20, "temperature": 0, "stream": True}, stream=True) as r:
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = list(sse_events(r))
        assert events[-1] == "[DONE]"
        pieces = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
        expected = want(["hello", "spell: 6 7 8"], ["hi"], 20)
        assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected
        assert "(llama, 1 process)" in srv.log()
    finally:
        srv.stop()


def test_export_help_is_fast_and_lists_arguments():
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_cmd

    start = time.time()
    out = run_cmd([sys.executable, os.path.join(ROOT, "export_model.py"), "--help"]).stdout
    assert time.time() - start < 10  # answered before paddle is imported
    for name in ("--model_name_or_path", "--lora_path", "--output_path", "--model_prefix", "--src_length", "--tgt_length", "--max_length", "--inference_model"):
        assert name in out
    proc = subprocess.run([sys.executable, "-m", "paddlellm.cli", "export", "--output_path", "x"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: model_name_or_path is required (a model folder or a PaddleNLP model name)"


def test_static_forward_gives_the_math_threads_back(exported, monkeypatch):
    """A paddle.inference run leaves the calling thread's math library on one thread; every static forward sets
    our runtime's count back (else the decode loop's own ops, and any dynamic model in the process, run on one)."""
    import paddle

    from paddlellm.formats import static as static_runtime
    from paddlellm.generation import generate_ids

    shell, tok = static_runtime.load_static(exported("llama"), get_family("llama"))
    calls = []
    real = paddle.base.core.set_num_threads
    monkeypatch.setattr(paddle.base.core, "set_num_threads", lambda n: calls.append(n) or real(n))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    replies = generate_ids(shell, tok, get_family("llama"), [[5, 6, 7], [8, 9]], 3)
    assert len(replies) == 2
    assert calls and set(calls) == {2} and len(calls) >= 3  # after every step's run


def test_predictor_frees_intermediates_in_batches(exported, monkeypatch):
    """Loading a static folder on CPU sets the executor's garbage-collection threshold to GC_BATCH_GB (paddle's 0
    hands every freed tensor to a spinning thread that took ~1 ms of CPU per decode step from a 2-core machine's
    math threads), and keeps a threshold the user set in the environment."""
    import paddle

    from paddlellm.formats import static as static_runtime

    def threshold():
        return paddle.get_flags("FLAGS_eager_delete_tensor_gb")["FLAGS_eager_delete_tensor_gb"]

    monkeypatch.delenv("FLAGS_eager_delete_tensor_gb", raising=False)
    paddle.set_flags({"FLAGS_eager_delete_tensor_gb": 0.0})
    try:
        static_runtime.load_static(exported("gpt-3"), get_family("gpt-3"))
        assert threshold() == static_runtime.GC_BATCH_GB == 0.01
        paddle.set_flags({"FLAGS_eager_delete_tensor_gb": 0.0})  # the user's own value (environment) is kept
        monkeypatch.setenv("FLAGS_eager_delete_tensor_gb", "0")
        static_runtime.load_static(exported("gpt-3"), get_family("gpt-3"))
        assert threshold() == 0.0
    finally:
        paddle.set_flags({"FLAGS_eager_delete_tensor_gb": static_runtime.GC_BATCH_GB})


@pytest.mark.parametrize("family,per_layer", [("gpt-3", 6), ("opt", 6), ("llama", 7), ("qwen2", 7)])
def test_inplace_program_joins_qkv(family, per_layer, exported, tiny_dir):
    """The step programs of GPT, OPT, LLaMA and Qwen2 compute each layer's q/k/v as one product over weights joined
    at export (inplace_step.StepHooks.join_products): per layer one [h, (heads + 2 kv_heads) * head_dim] weight, and
    6 products (q/k/v, two attention, out, two feed-forward; LLaMA's gated feed-forward 3) plus the head, where the
    runner's own code has two more per layer. test_inplace_runner_equals_dynamic_runner proves logits and tokens."""
    config = get_family(family).load_model(tiny_dir(family)).config
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    joined = (heads + 2 * kv_heads) * (hidden // heads)
    with open(os.path.join(exported(family), "model.json"), encoding="utf-8") as f:
        program = f.read()
    assert program.count('"#":"1.matmul"') == per_layer * layers + 1
    ops = json.loads(program)["program"]["regions"][0]["blocks"][0]["ops"]
    params = {op["A"][3]: op["O"]["TT"]["D"][1] for op in ops if op.get("#") == "p"}  # name -> shape
    # the joined weights are buffers made at export (no layer's "<layer>.w_<n>" parameter name)
    assert sum(".w_" not in name and shape == [hidden, joined] for name, shape in params.items()) == layers


# ------------------------------------------------------------------ the step program itself
@pytest.mark.parametrize("family", ["chatglm", "glm"])
def test_step_logits_equal_dynamic(family, tiny_dir, tmp_path, monkeypatch):
    """Format 1 (the model forward with a concatenated cache: prefix-tuning exports and older folders), on the two
    prefix LMs (a 4-D mask, 2-D positions, ChatGLM's 1-tuple cache), exported with their in-place step turned off."""
    import paddle

    from paddlellm.commands.export import probe
    from paddlellm.formats.static import flatten, load_static

    fam = get_family(family)
    monkeypatch.setattr(type(fam), "static_step", lambda self, model: None)
    folder = str(tmp_path / "format1")
    assert export("--model_name_or_path", tiny_dir(family), "--output_path", folder, "--src_length", "48", "--tgt_length", "6") == 0
    assert json.load(open(os.path.join(folder, "static_meta.json")))["format_version"] == 1
    model = fam.static_export_model(tiny_dir(family))
    model.eval()
    shell, tok = load_static(folder, fam)
    forward = shell.forward
    assert not forward.config.mkldnn_enabled()  # oneDNN gives wrong values here (see static_runtime)
    # no fixed 1 anywhere in the program's input shapes (what triggers the oneDNN bug); batch/seq dims dynamic
    specs = program_inputs(os.path.join(folder, "model.json"))
    assert list(specs) == forward.predictor.get_input_names()
    for name, shape in specs.items():
        assert 1 not in shape and shape[0] == -1, (name, shape)
    meta = json.load(open(os.path.join(folder, "static_meta.json")))
    assert all(s.count("seq") == 1 and s.count("batch") == 1 for s in meta["cache_shapes"])

    calls = probe(model, tok, fam)  # what generate() feeds the forward: prefill (no cache) and decode steps, 2 batch shapes
    kinds = set()
    strided = 0
    with paddle.no_grad():
        for call in calls:
            kwargs = call["kwargs"]
            decode = any(isinstance(kwargs.get(k), (list, tuple)) for k in ("past_key_values", "cache"))
            kinds.add(decode)
            strided += not kwargs["input_ids"].is_contiguous()
            got, want = flatten(forward(**kwargs)), flatten(call["output"])
            np.testing.assert_allclose(got[0][:, -1].numpy(), want[0][:, -1].numpy(), atol=1e-5, rtol=0)
            assert len(got) == len(want)
            for g, w in zip(got[1:], want[1:]):  # the new cache, tensor by tensor
                np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-5, rtol=0)
    assert kinds == {False, True} and strided  # prefill and decode were compared; generate() passed strided views
    # What a run returned survives the next run (predictor.run's outputs can live in memory it reuses).
    with paddle.no_grad():
        kept = forward(**calls[1]["kwargs"])
        first = [t.numpy().copy() for t in flatten(kept)]
        forward(**calls[0]["kwargs"])
    assert all(np.array_equal(a, t.numpy()) for a, t in zip(first, flatten(kept)))

    # Token ids too (a tiny model's text can decode to ""): seeded sampling with every option, then greedy.
    from paddlellm.generation import generate_ids

    prompts = [fam.generation_prompt(tok, [t], [], 48) for t in ("spell: 1 2", "hello there, how are you today?", "x")]
    for sampling in (dict(top_k=5, top_p=0.9, temperature=0.8, repetition_penalty=1.2), {}):
        ids = []
        for m in (model, shell):
            paddle.seed(3)
            ids.append(generate_ids(m, tok, fam, prompts, 8, **sampling))
        assert ids[0] == ids[1] and sum(map(len, ids[0])) > 0, sampling

    # A strided view gives the same logits as a contiguous copy (predictor.run ignores strides by itself).
    kwargs = dict(next(c["kwargs"] for c in calls if c["kwargs"]["input_ids"].shape[1] == 1))
    base = paddle.to_tensor(np.arange(kwargs["input_ids"].shape[0] * 3).reshape([-1, 3]) % 50 + 5, dtype="int64")
    view = base[:, 1:2]
    assert not view.is_contiguous()
    with paddle.no_grad():
        a = flatten(forward(**dict(kwargs, input_ids=view)))[0].numpy()
        b = flatten(forward(**dict(kwargs, input_ids=view.contiguous())))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0  # rows really differ (a stride bug would repeat row 0's input)


# ------------------------------------------------------------------ in-place exports (format 3)
@pytest.mark.parametrize("family", INPLACE)
def test_inplace_runner_equals_dynamic_runner(family, tiny_dir, exported):
    """The in-place program's runner gives the dynamic decode runner's logits within 1e-5: a left-padded batch of
    mixed lengths (prefilled in several chunks), then steps past the first cache growth (KV_GROW slots); a padding
    hole."""
    import paddle

    from paddlellm.formats import static as static_runtime
    from paddlellm.generation import _generation_inputs

    fam = get_family(family)
    folder = exported(family)
    model = fam.load_model(tiny_dir(family))
    model.eval()
    shell, tok = static_runtime.load_static(folder, fam)
    forward = shell.forward
    assert isinstance(forward, static_runtime.InPlaceForward) and not forward.config.mkldnn_enabled()
    specs = program_inputs(os.path.join(folder, "model.json"))  # no fixed 1 (the oneDNN bug); batch/seq dims dynamic
    assert list(specs) == forward.program.predictor.get_input_names()
    assert len(forward.program.predictor.get_output_names()) == 1  # the logits only: the cache is written in place
    assert specs.pop("slot") == [1]  # the cache slot of the first new token
    assert all(1 not in shape and shape[0] == -1 for shape in specs.values()), specs
    texts = ["hello there, how are you today? tell me a long story", "x", "spell: 1 2 3", "hi"]
    prompts = [fam.generation_prompt(tok, [t], [], 48) for t in texts]
    steps = static_runtime.KV_GROW + 6
    # (GLM lays its positions out for the new tokens in advance: room for every step)
    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, steps + 1).items()}
    dynamic, static = fam.decode_runner(model), static_runtime.inplace_runner(shell)
    keep = inputs["attention_mask"].numpy() > 0
    keep = keep if keep.ndim == 2 else keep[:, 0, -1]  # a prefix LM's 4-D prompt mask: what its last row attends
    assert dynamic is not None and len(static_runtime.prefill_chunks(keep.sum(1))) > 1
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        want, got = dynamic.prefill(inputs, 200), static.prefill(inputs, 200)
        capacity = static.capacity
        for i in range(steps + 1):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0, err_msg=f"step {i}")
            if i < steps:
                tokens = paddle.to_tensor(rng.integers(5, 200, [len(texts), 1]), dtype="int64")
                want, got = dynamic.step(tokens), static.step(tokens[:, :1])
    assert static.capacity > capacity  # the cache grew (one copy) and kept its contents
    # a padding hole inside a row is masked like padding (Bloom: it does not advance ALiBi's key positions, OPT: its
    # positions)
    mask = inputs["attention_mask"].numpy().copy()
    mask[(0, -5) if mask.ndim == 2 else (0, 0, slice(None), -5)] = 0  # 4-D: no row attends the column
    holed = dict(inputs, attention_mask=paddle.to_tensor(mask))
    with paddle.no_grad():
        room = inputs["input_ids"].shape[1] + 4
        want, got = dynamic.prefill(holed, room), static.prefill(holed, room)
        for i in range(4):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0, err_msg=f"hole, step {i}")
            tokens = paddle.to_tensor(rng.integers(5, 200, [len(texts), 1]), dtype="int64")
            want, got = dynamic.step(tokens), static.step(tokens)

    # generate() itself on the host (paths the decode loop does not reproduce): its forward answers from the same
    # program with a concatenated cache; the first decode step's logits equal the dynamic model's
    from paddlellm.commands.export import probe

    calls = probe(model, tok, fam)
    seen = []
    object.__setattr__(shell, "forward", lambda **kw: seen.append(kw) or forward(**kw))
    try:
        probe(shell, tok, fam)
    finally:
        object.__setattr__(shell, "forward", forward)
    assert len(seen) == len(calls) == 6 and sum(kw[forward.cache_key] is None for kw in seen) == 2
    with paddle.no_grad():
        for mine, theirs in zip(seen, calls):
            got, want = forward(**mine)[0], theirs["output"][0]
            np.testing.assert_allclose(got[:, -1].numpy(), want[:, -1].numpy(), atol=1e-5, rtol=0)
        # a strided view gives the same logits as a contiguous copy (predictor.run ignores strides by itself)
        kwargs = seen[-1]
        base = paddle.to_tensor(np.arange(kwargs["input_ids"].shape[0] * 3).reshape([-1, 3]) % 50 + 5, dtype="int64")
        view = base[:, 1:2]
        assert not view.is_contiguous()
        a = forward(**dict(kwargs, input_ids=view))[0].numpy()
        b = forward(**dict(kwargs, input_ids=view.contiguous()))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0  # rows really differ (a stride bug would repeat row 0's input)

    # Token ids, generate() and the decode loop: seeded sampling with every option, then greedy.
    from paddlellm.generation import generate_ids

    for sampling in (dict(top_k=5, top_p=0.9, temperature=0.8, repetition_penalty=1.2), {}):
        ids = []
        for m, own in ((model, True), (shell, True), (shell, False)):
            paddle.seed(3)
            ids.append(generate_ids(m, tok, fam, prompts, 8, own_loop=own, **sampling))
        assert ids[0] == ids[1] == ids[2] and sum(map(len, ids[0])) > 0, sampling


def test_format_1_llama_export_still_predicts(tiny_dir, tmp_path, monkeypatch):
    """A LLaMA folder exported as format 1 (the model forward with a concatenated cache, before in-place exports) still runs."""
    from paddlellm.families.llama import LlamaFamily

    monkeypatch.setattr(LlamaFamily, "static_step", lambda self, model: None)
    folder = str(tmp_path / "old")
    assert export("--model_name_or_path", tiny_dir("llama"), "--output_path", folder) == 0
    assert json.load(open(os.path.join(folder, "static_meta.json")))["format_version"] == 1
    data = write_jsonl(tmp_path / "data.json", DATA)
    outs = [str(tmp_path / "dynamic.json"), str(tmp_path / "static.json")]
    for model, out in zip((tiny_dir("llama"), folder), outs):
        assert predict("--model_name_or_path", model, "--data_file", data, "--output_file", out, "--batch_size", "4") == 0
    assert read_jsonl(outs[0]) == read_jsonl(outs[1])
