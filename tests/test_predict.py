"""predict_generation.py on tiny models: every family with base, LoRA and prefix checkpoints; exact outputs
against one-by-one greedy generation, input order, saved settings, resume, data parallel, one-line errors."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd
from paddlellm.families import get_family

os.environ["PADDLELLM_NO_PROGRESS"] = "1"  # no progress bar in the test log (it is on by default)

# Lengths differ on purpose (bucketing reorders them); multi-turn with and without a reference; no tgt at all.
DATA = [
    {"src": "spell: 1 2", "tgt": "one two"},
    {"src": "hello there, how are you today? tell me a long story about numbers and words", "tgt": "fine"},
    {"src": ["hello", "spell: 4 5"], "tgt": ["hi", "four five"]},
    {"src": ["hello", "spell: 6"], "tgt": ["hi"]},
    {"src": "x"},
    {"src": "spell: 7 8 9", "tgt": "seven eight nine"},
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def reference(row):
    src = row["src"] if isinstance(row["src"], list) else [row["src"]]
    tgt = row.get("tgt")
    tgt = [] if tgt is None else tgt if isinstance(tgt, list) else [tgt]
    return tgt[-1] if len(tgt) == len(src) else None


def predict(*argv):
    from paddlellm.commands.predict import main

    return main(list(argv))


def expected_outputs(rows, src_length, tgt_length, model_name_or_path=None, lora_path=None, prefix_path=None):
    """Greedy replies generated one prompt at a time, the straightforward way."""
    from paddlellm.generation import decode, generate_ids
    from paddlellm.loading import load_for_inference

    model, tok, fam, _ = load_for_inference(model_name_or_path, lora_path, prefix_path)
    out = []
    for row in rows:
        src = row["src"] if isinstance(row["src"], list) else [row["src"]]
        tgt = row.get("tgt") or []
        tgt = tgt if isinstance(tgt, list) else [tgt]
        prompt = fam.generation_prompt(tok, src, tgt[: len(src) - 1], src_length)
        out.append(decode(tok, generate_ids(model, tok, fam, [prompt], tgt_length)[0]))
    return out


def logits_of(model, tokenizer, family, rows=(("spell: 1 2", "one two"), ("hello there friend", "hi"), ("x", "y z"))):
    """Logits [batch, seq, vocab] of a few src/tgt examples laid out as in training (float32 numpy)."""
    import paddle

    examples = [family.encode(tokenizer, [s], [t], 32, 16) for s, t in rows]
    batch = family.build_batch([[e] for e in examples], tokenizer.pad_token_id)
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k not in ("labels", "loss_mask")}
    with paddle.no_grad():
        out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits.astype("float32").numpy()


# ------------------------------------------------------------------ adapters (what finetune_generation.py writes)
def write_meta(folder, family, kind, base, src_length, tgt_length):
    meta = {"family": family, "kind": kind, "base_model": base, "src_length": src_length, "tgt_length": tgt_length,
            "dtype": "float32", "chat_format": family}
    with open(os.path.join(folder, "paddlellm_meta.json"), "w") as f:
        json.dump(meta, f)


def make_lora(base, out, family, seed=0, scale=0.5, src_length=48, tgt_length=5):
    """A LoRA output folder (same files as finetune_generation.py --lora) with random, non-zero lora_B
    (a fresh lora_B is zero, which would make every comparison with the base model vacuous)."""
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    from paddlellm.tuning import all_linear_targets

    fam = get_family(family)
    tok = fam.load_tokenizer(base)
    model = fam.load_model(base)
    cfg = LoRAConfig(target_modules=fam.lora_target_modules or all_linear_targets(model), r=4, lora_alpha=8,
                     merge_weights=False, dtype="float32", base_model_name_or_path=base)
    lora = LoRAModel(model, cfg)
    paddle.seed(seed)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.set_value(paddle.randn(p.shape) * scale)
    lora.save_pretrained(out)
    tok.save_pretrained(out)
    write_meta(out, family, "lora", base, src_length, tgt_length)
    return out


def make_prefix(base, out, family, seed=0, src_length=48, tgt_length=5):
    """A prefix-tuning output folder (same files as finetune_generation.py --prefix_tuning), random prefix."""
    import paddle
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    fam = get_family(family)
    tok = fam.load_tokenizer(base)
    paddle.seed(seed)
    model = fam.load_model(base)
    postprocess, pad_mask = fam.prefix_hooks()
    cfg = PrefixConfig(num_prefix_tokens=4, prefix_projection=False, dtype="float32", **fam.prefix_config_kwargs(model.config))
    prefix = PrefixModelForCausalLM(model, cfg, postprocess, pad_mask)
    prefix.save_pretrained(out)
    tok.save_pretrained(out)
    write_meta(out, family, "prefix", base, src_length, tgt_length)
    return out


# ------------------------------------------------------------------ every family, base checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_outputs_in_input_order(family, tiny_dir, tmp_path):
    model = tiny_dir(family)
    data = write_jsonl(tmp_path / "data.json", DATA)
    out = str(tmp_path / "out" / "pred.json")
    extra = ["--gpt", "true"] if family == "gpt-3" else []  # PaddleNLP's GPT flag is accepted
    assert predict("--model_name_or_path", model, "--data_file", data, "--output_file", out, "--batch_size", "4",
                   "--src_length", "48", "--tgt_length", "6", "--top_k", "1", *extra) == 0
    rows = read_jsonl(out)
    want = expected_outputs(DATA, 48, 6, model)
    assert [r["output"] for r in rows] == want  # batched + length-bucketed == one by one, in input order
    assert [r["src"] for r in rows] == [d["src"] for d in DATA]
    assert [r["tgt"] for r in rows] == [reference(d) for d in DATA]
    assert all(set(r) == {"src", "tgt", "output"} for r in rows)
    assert sorted(os.listdir(tmp_path / "out")) == ["pred.json", "pred.json.settings.json"]  # no .partial / .tmp left behind


# ------------------------------------------------------------------ every family, LoRA and prefix outputs
@pytest.mark.parametrize("kind", ["lora", "prefix"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_outputs_read_saved_settings(family, kind, tiny_dir, tmp_path):
    base = tiny_dir(family)
    if kind == "prefix" and not get_family(family).supports.get("prefix"):
        pytest.skip(f"{family} does not support prefix tuning")
    adapter = (make_lora if kind == "lora" else make_prefix)(base, str(tmp_path / kind), family, src_length=40, tgt_length=4)
    data = write_jsonl(tmp_path / "data.json", DATA)
    out = str(tmp_path / "pred.json")
    # Only the adapter: its base model, src_length=40 and tgt_length=4 come from its saved settings.
    assert predict(f"--{kind}_path", adapter, "--data_file", data, "--output_file", out, "--batch_size", "3") == 0
    got = [r["output"] for r in read_jsonl(out)]
    args = {"lora_path": adapter} if kind == "lora" else {"prefix_path": adapter}
    assert got == expected_outputs(DATA, 40, 4, **args)
    # The adapter is applied: the logits move (tiny random models often greedily repeat the last prompt
    # token with or without an adapter, so the generated text alone would not show it).
    from paddlellm.loading import load_for_inference

    with_adapter = logits_of(*load_for_inference(None, **args)[:3])
    without = logits_of(*load_for_inference(base)[:3])
    assert np.abs(with_adapter - without).max() > 1e-3
    # The output folder itself may be given as model_name_or_path (as with a full fine-tune).
    out2 = str(tmp_path / "pred2.json")
    assert predict("--model_name_or_path", adapter, "--data_file", data, "--output_file", out2, "--batch_size", "2") == 0
    assert [r["output"] for r in read_jsonl(out2)] == got


def test_finetune_outputs_llama(tiny_dir, tmp_path):
    """The real finetune_generation.py outputs (LoRA and prefix) predict with nothing but their folder."""
    from paddlellm.commands import finetune

    base = tiny_dir("llama")
    folder = tmp_path / "ft"
    folder.mkdir()
    write_jsonl(folder / "train.json", [d for d in DATA if d.get("tgt") and len(d["tgt"] if isinstance(d["tgt"], list) else [1]) ==
                                        (len(d["src"]) if isinstance(d["src"], list) else 1)])
    data = write_jsonl(tmp_path / "data.json", DATA)
    for method, extra in (("lora", ["--lora", "true", "--lora_rank", "4", "--learning_rate", "1e-2"]),
                          ("prefix", ["--prefix_tuning", "true", "--num_prefix_tokens", "4", "--learning_rate", "1e-1"])):
        out_dir = str(tmp_path / method)
        assert finetune.run(["--model_name_or_path", base, "--dataset_name_or_path", str(folder), "--output_dir", out_dir,
                             "--per_device_train_batch_size", "2", "--max_steps", "3", "--evaluation_strategy", "no",
                             "--save_strategy", "no", "--disable_tqdm", "true", "--src_length", "30", "--tgt_length", "3",
                             "--logging_steps", "1", "--seed", "1", *extra]) == 0
        out = str(tmp_path / f"{method}.json")
        assert predict("--model_name_or_path", out_dir, "--data_file", data, "--output_file", out) == 0
        args = {"lora_path": out_dir} if method == "lora" else {"prefix_path": out_dir}
        assert [r["output"] for r in read_jsonl(out)] == expected_outputs(DATA, 30, 3, **args)


# ------------------------------------------------------------------ incremental output and resume
def test_interrupted_run_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    import paddlellm.generation as generation

    model = tiny_dir("llama")
    rows = [{"src": f"spell: {' '.join(str(d) for d in range(i % 5 + 1))}", "tgt": "x"} for i in range(10)]
    data = write_jsonl(tmp_path / "data.json", rows)
    out = str(tmp_path / "pred.json")
    common = ["--model_name_or_path", model, "--data_file", data, "--output_file", out, "--batch_size", "2",
              "--src_length", "32", "--tgt_length", "4"]
    full = str(tmp_path / "full.json")
    assert predict(*common[:5], full, *common[6:]) == 0

    real = generation.generate_ids
    calls = []

    def crash_after(n):
        def fake(model, tokenizer, family, prompts, *a, **k):
            if len(calls) == n:
                raise KeyboardInterrupt  # the run dies in its (n+1)-th batch
            calls.append(len(prompts))
            return real(model, tokenizer, family, prompts, *a, **k)
        return fake

    monkeypatch.setattr(generation, "generate_ids", crash_after(3))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        predict(*common)
    assert e.value.code == 130  # Ctrl-C: the usual status, and a pointer to --resume
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        f"predict: 6 of 10 lines are kept in {out}.partial; add --resume true to the same command to continue", "error: interrupted"]
    assert not os.path.exists(out)  # no output file until it is complete
    journal = read_jsonl(out + ".partial")
    assert journal[0]["records"] == 10 and len(journal) == 1 + 6  # header + 3 finished batches of 2
    with open(out + ".partial", "a") as f:
        f.write('{"i": 9, "src": "spell: 0 1 2 3 4", "tg')  # a torn line, as a crash mid-write leaves
    calls.clear()
    monkeypatch.setattr(generation, "generate_ids", crash_after(99))
    assert predict(*common, "--resume", "true") == 0
    assert sum(calls) == 4  # only the 4 unfinished examples were generated
    assert read_jsonl(out) == read_jsonl(full)  # identical to the uninterrupted run, in input order
    assert not os.path.exists(out + ".partial")
    calls.clear()
    assert predict(*common, "--resume", "true") == 0 and calls == []  # a finished output: nothing left to do

    # A journal of other settings is refused, not silently mixed in.
    calls.clear()
    monkeypatch.setattr(generation, "generate_ids", crash_after(1))
    with pytest.raises(SystemExit):
        predict(*common)
    monkeypatch.setattr(generation, "generate_ids", real)
    with pytest.raises(SystemExit) as e:
        predict(*common[:-1], "5", "--resume", "true")
    assert e.value.code == 2
    # Without --resume a leftover journal is discarded and the run starts over.
    assert predict(*common) == 0
    assert read_jsonl(out) == read_jsonl(full)


# ------------------------------------------------------------------ data parallel under paddle.distributed.launch
def test_distributed_launch_rank0_writes(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    rows = [{"src": f"spell: {i} {i + 1}", "tgt": "x"} for i in range(7)]
    data = write_jsonl(tmp_path / "data.json", rows)
    single = str(tmp_path / "single.json")
    assert predict("--model_name_or_path", model, "--data_file", data, "--output_file", single, "--batch_size", "2",
                   "--src_length", "32", "--tgt_length", "4") == 0
    out = str(tmp_path / "dist.json")
    logs = str(tmp_path / "logs")
    run_cmd([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
             os.path.join(ROOT, "predict_generation.py"), "--model_name_or_path", model, "--data_file", data,
             "--output_file", out, "--batch_size", "2", "--src_length", "32", "--tgt_length", "4", "--device", "cpu"],
            env={"PADDLELLM_NO_PROGRESS": "1"}, timeout=300)
    assert read_jsonl(out) == read_jsonl(single)
    assert sorted(os.listdir(tmp_path)) == sorted(["data.json", "single.json", "dist.json", "logs", "single.json.settings.json",
                                                   "dist.json.settings.json"])
    log0 = open(os.path.join(logs, "workerlog.0")).read()
    log1 = open(os.path.join(logs, "workerlog.1")).read()
    assert "predict: wrote 7 lines" in log0 and "predict: wrote" not in log1  # only rank 0 writes


# ------------------------------------------------------------------ one-line errors
def cli(*argv, timeout=120):
    return run_cmd([sys.executable, os.path.join(ROOT, "predict_generation.py"), *argv], check=False, timeout=timeout)


def assert_error(proc, expected, *absent):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip() and not l.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1 and lines[0] == f"error: {expected}", proc.stderr[-3000:]
    for path in absent:
        assert not os.path.exists(path) and not os.path.exists(path + ".partial")


@pytest.mark.parametrize("case", ["missing_src", "invalid_json", "bad_type", "no_history", "too_many_turns"])
def test_bad_data(case, tmp_path):
    good = '{"src": "a", "tgt": "b"}\n'
    text, message = {
        "missing_src": (good + '{"tgt": "b"}\n', "2: missing field 'src'"),
        "invalid_json": (good + good + '{"src": "a",}\n', "3: invalid JSON: Expecting property name enclosed in double quotes (column 13)"),
        "bad_type": ('{"src": ["a", 2]}\n', "1: field 'src' must be a string or a list of strings, got list"),
        "no_history": ('{"src": ["a", "b", "c"], "tgt": ["x"]}\n', "1: field 'tgt' must have as many turns as 'src' or one fewer (1 vs 3)"),
        "too_many_turns": ('{"src": "a", "tgt": ["x", "y"]}\n', "1: field 'tgt' must have as many turns as 'src' or one fewer (2 vs 1)"),
    }[case]
    data = tmp_path / "data.json"
    data.write_text(text)
    out = str(tmp_path / "out.json")
    assert_error(cli("--model_name_or_path", "/nonexistent", "--data_file", str(data), "--output_file", out), f"{data}:{message}", out)


def test_multi_turn_without_history(tmp_path):
    data = write_jsonl(tmp_path / "data.json", [{"src": "a"}, {"src": ["a", "b"]}])
    out = str(tmp_path / "out.json")
    assert_error(cli("--model_name_or_path", "m", "--data_file", data, "--output_file", out),
                 f"{data}:2: field 'tgt' must hold the 1 earlier replies of the multi-turn 'src' (and may add the reference reply), got 0", out)


def test_argument_errors(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    data = write_jsonl(tmp_path / "data.json", DATA[:2])
    out = str(tmp_path / "out.json")
    base = ["--data_file", data, "--output_file", out]
    assert_error(cli(*base), "model_name_or_path is required (a model folder or a PaddleNLP model name)", out)
    assert_error(cli("--model_name_or_path", str(tmp_path / "nope"), *base), f"model_name_or_path '{tmp_path / 'nope'}': no such folder", out)
    assert_error(cli("--model_name_or_path", model, "--output_file", out), 'data_file is required: a JSONL file of {"src": ..., "tgt": ...} lines', out)
    assert_error(cli("--model_name_or_path", model, "--data_file", str(tmp_path / "none.json"), "--output_file", out),
                 f"data_file '{tmp_path / 'none.json'}': no such file", out)
    assert_error(cli("--model_name_or_path", model, *base, "--dtype", "float64"),
                 "--dtype: dtype must be one of float32, float16, bfloat16, got 'float64'", out)
    assert_error(cli("--model_name_or_path", model, *base, "--lora_path", str(tmp_path)),
                 f"lora_path '{tmp_path}': no lora_config.json (not a folder saved by a lora fine-tuning run)", out)
    assert_error(cli("--model_name_or_path", model, *base, "--batch_size", "0"), "--batch_size must be at least 1, got 0", out)
    (tmp_path / "afile").write_text("x")
    assert_error(cli("--model_name_or_path", model, "--data_file", data, "--output_file", str(tmp_path / "afile" / "o.json")),
                 f"the folder of output_file '{tmp_path / 'afile'}' is a file; give a folder")
    # An adapter whose recorded base model was moved away: say so, and how to point at it.
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "lora_config.json").write_text("{}")
    (lora / "paddlellm_meta.json").write_text(json.dumps({"family": "llama", "kind": "lora", "base_model": str(tmp_path / "moved")}))
    assert_error(cli("--lora_path", str(lora), *base),
                 f"the base model '{tmp_path / 'moved'}' recorded in '{lora}' is not there (moved or deleted?); "
                 "pass --model_name_or_path with its new place", out)


def test_device_and_dtype_errors(tiny_dir, tmp_path):
    """Needs paddle loaded to know: a CPU-only build refuses gpu and half precision with one line."""
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this paddle has CUDA")
    model = tiny_dir("llama")
    data = write_jsonl(tmp_path / "data.json", DATA[:2])
    out = str(tmp_path / "out.json")
    base = ["--model_name_or_path", model, "--data_file", data, "--output_file", out]
    assert_error(cli(*base, "--device", "gpu"), "--device gpu: this paddlepaddle build has no CUDA support (install paddlepaddle-gpu, or use --device cpu)", out)
    assert_error(cli(*base, "--dtype", "float16"), "--dtype float16: paddle's CPU kernels have no float16 matmul; use --dtype float32 on CPU (or a GPU)", out)


def test_help_is_fast_and_lists_arguments():
    code = ("import atexit, sys; atexit.register(lambda: print('PADDLE_LOADED' if 'paddle' in sys.modules else 'PADDLE_NOT_LOADED'));"
            "from paddlellm.cli import main; main(['predict', '--help'])")
    out = run_cmd([sys.executable, "-c", code]).stdout
    for name in ("--model_name_or_path", "--batch_size", "--src_length", "--tgt_length", "--lora_path", "--prefix_path", "--top_k",
                 "--top_p", "--temperature", "--data_file", "--output_file", "--device", "--dtype", "--gpt", "--repetition_penalty",
                 "--seed", "--resume"):
        assert name in out
    assert out.strip().endswith("PADDLE_NOT_LOADED")
