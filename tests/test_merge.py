"""merge_lora_params.py and merge_tp_params.py on tiny models of every family.

LoRA: the merged model read back from disk gives the logits of base + adapters (float32, max abs diff
< 1e-5 of the largest logit: (W + BA)x and Wx + B(Ax) round differently, and MKL's summation order can
change with the threads it gets) and the same greedy generations. Tensor parallel: a model split with PaddleNLP's own split
mappings into 2 and 4 shards, written as the Trainer writes them, merges back bit-identically.
"""
import copy
import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd
from paddlellm.families import get_family
from test_predict import DATA, logits_of, make_lora, read_jsonl, write_jsonl

os.environ["PADDLELLM_NO_PROGRESS"] = "1"
PROMPTS = ["spell: 1 2", "hello there, how are you today?", "x"]


def greedy(model, tok, fam, n=8):
    from paddlellm.generation import generate_ids

    return generate_ids(model, tok, fam, [fam.generation_prompt(tok, [p], [], 48) for p in PROMPTS], n)


def read_weights(folder):
    """Every tensor saved in a model folder (safetensors or pdparams), as numpy."""
    from paddlenlp.transformers.model_utils import load_state_dict

    state = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.pdparams"))):
        state.update({k: v.numpy() for k, v in load_state_dict(f).items()})
    return state


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_equals_base_plus_adapters(family, tiny_dir, tmp_path):
    from paddlellm.loading import load_for_inference
    from paddlellm.commands.merge import main_lora

    base = tiny_dir(family)
    lora = make_lora(base, str(tmp_path / "lora"), family, seed=1)
    out = str(tmp_path / "merged")
    assert main_lora(["--lora_path", lora, "--merge_model_path", out]) == 0  # base model read from the LoRA folder

    names = sorted(os.listdir(out))
    assert "model.safetensors" in names and "config.json" in names and "tokenizer_config.json" in names
    assert not any(n.startswith("lora_") for n in names)
    assert not any(".merging-" in n for n in os.listdir(tmp_path))
    with open(os.path.join(out, "paddlellm_meta.json")) as f:
        meta = json.load(f)
    assert meta["family"] == family and meta["kind"] == "base" and meta["tgt_length"] == 5

    adapted, tok, fam, _ = load_for_inference(None, lora_path=lora)
    merged, tok2, _, _ = load_for_inference(out)  # a standalone folder, read back from disk
    plain, _, _, _ = load_for_inference(base)
    a, b, c = logits_of(adapted, tok, fam), logits_of(merged, tok2, fam), logits_of(plain, tok, fam)
    assert np.abs(a - b).max() < 1e-5 * max(1.0, float(np.abs(a).max()))
    assert np.abs(a - c).max() > 1e-2  # the adapters matter: the comparison is not vacuous
    assert greedy(adapted, tok, fam) == greedy(merged, tok2, fam)
    assert not any("lora" in k for k in read_weights(out))


def test_merge_lora_with_tokenizer_flag(tiny_dir, tmp_path):
    """--with_tokenizer (PaddleNLP's name, as in merge_tp_params.py): false saves weights and config only."""
    from paddlellm.commands.merge import main_lora

    base = tiny_dir("llama")
    lora = make_lora(base, str(tmp_path / "lora"), "llama", seed=1)
    bare, full = str(tmp_path / "bare"), str(tmp_path / "full")
    assert main_lora(["--lora_path", lora, "--merge_model_path", bare, "--with_tokenizer", "false"]) == 0
    assert main_lora(["--lora_path", lora, "--merge_model_path", full, "--with_tokenizer", "true"]) == 0
    assert not any(n.startswith(("tokenizer", "sentencepiece", "special_tokens")) for n in os.listdir(bare))
    assert {"tokenizer_config.json", "sentencepiece.bpe.model"} <= set(os.listdir(full))
    weights = read_weights(bare)
    assert weights.keys() == read_weights(full).keys() and all(np.array_equal(weights[k], v) for k, v in read_weights(full).items())


def test_merge_lora_of_a_finetune_run_then_predict(tiny_dir, tmp_path):
    """finetune_generation.py --lora -> merge_lora_params.py -> predict_generation.py, as a user runs them."""
    from paddlellm.commands import finetune
    from paddlellm.loading import load_for_inference
    from paddlellm.commands.merge import main_lora
    from paddlellm.commands.predict import main as predict

    base = tiny_dir("llama")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.json", [{"src": "spell: 1 2", "tgt": "one two"}, {"src": "spell: 3", "tgt": "three"}])
    ft = str(tmp_path / "ft")
    assert finetune.run(["--model_name_or_path", base, "--dataset_name_or_path", str(data_dir), "--output_dir", ft,
                         "--lora", "true", "--lora_rank", "4", "--learning_rate", "5e-2", "--per_device_train_batch_size", "2",
                         "--max_steps", "4", "--evaluation_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
                         "--src_length", "30", "--tgt_length", "4", "--logging_steps", "1", "--seed", "1"]) == 0
    out = str(tmp_path / "merged")
    assert main_lora(["--model_name_or_path", base, "--lora_path", ft, "--merge_lora_model_path", out]) == 0
    adapted, tok, fam, _ = load_for_inference(ft)
    merged, _, _, _ = load_for_inference(out)
    assert np.abs(logits_of(adapted, tok, fam) - logits_of(merged, tok, fam)).max() < 1e-5
    data = write_jsonl(tmp_path / "data.json", DATA)
    for model, name in ((ft, "a.json"), (out, "b.json")):
        assert predict(["--model_name_or_path", model, "--data_file", data, "--output_file", str(tmp_path / name)]) == 0
    assert read_jsonl(tmp_path / "a.json") == read_jsonl(tmp_path / "b.json")  # merged model predicts as base + LoRA


# ------------------------------------------------------------------ tensor parallel
def tp_base(family, tiny, out):
    """The tiny model with its vocabulary rounded up to a multiple of 4, so every mapping can split it 2 and 4 ways."""
    import paddle

    fam = get_family(family)
    config = fam.paddlenlp_class("config_class").from_pretrained(tiny)
    config.vocab_size = -(-config.vocab_size // 4) * 4
    paddle.seed(3)
    model = fam.paddlenlp_class("model_class")(config)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(os.path.join(tiny, "paddlellm_meta.json"), out)
    fam.load_tokenizer(tiny).save_pretrained(out)
    return model


def split_actions(model_class, config, keys, degree, rank):
    """PaddleNLP's own split actions (is_split=True) for one rank, keyed by real parameter names."""
    cfg = copy.deepcopy(config)
    cfg.tensor_parallel_degree, cfg.tensor_parallel_rank = degree, rank
    mappings = model_class._get_tensor_parallel_mappings(cfg, is_split=True)
    return {real: mappings[k] for k, real in model_class._resolve_prefix_keys(mappings.keys(), keys).items()}


def apply_split(action, array):
    import paddle

    try:
        out = action(array)
    except (TypeError, ValueError):  # ChatGLM2's fused qkv / mlp split functions take paddle tensors
        out = action(paddle.to_tensor(array))
    return out.numpy() if isinstance(out, paddle.Tensor) else np.ascontiguousarray(out)


def write_tp_shards(model, full, folder, degree, safe, max_shard_size="10GB", extras_from=None):
    """Split `full` (name -> numpy) into `degree` ranks and save each as the Trainer does:
    save_pretrained(variant="tpXX") with config.tensor_parallel_degree = degree (+ tokenizer and metadata)."""
    import paddle

    config = copy.deepcopy(model.config)
    config.tensor_parallel_degree = degree
    for rank in range(degree):
        actions = split_actions(type(model), config, list(full), degree, rank)
        shard = {k: paddle.to_tensor(apply_split(actions[k], v) if k in actions else v) for k, v in full.items()}
        assert any(tuple(shard[k].shape) != v.shape for k, v in full.items())  # something really is split
        model.save_pretrained(folder, state_dict=shard, variant=f"tp{rank:02d}", safe_serialization=safe,
                              config_to_save=copy.deepcopy(config), is_main_process=rank == 0, max_shard_size=max_shard_size)
    if extras_from:
        for name in os.listdir(extras_from):
            if not name.endswith((".safetensors", ".pdparams")) and name not in ("config.json", "generation_config.json"):
                shutil.copy(os.path.join(extras_from, name), folder)


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).supports.get("tensor_parallel")])
def test_merge_tp_is_bit_identical(family, degree, tiny_dir, tmp_path):
    from paddlellm.commands.merge import main_tp

    model = tp_base(family, tiny_dir(family), str(tmp_path / "base"))
    original = read_weights(str(tmp_path / "base"))
    # .pdparams, .safetensors, and safetensors split by size into several files per rank (with index files)
    for fmt, safe, size in (("pdparams", False, "10GB"), ("safetensors", True, "10GB"), ("sharded", True, "40KB")):
        shards = str(tmp_path / f"tp-{fmt}")
        write_tp_shards(model, original, shards, degree, safe, size, extras_from=str(tmp_path / "base"))
        names = os.listdir(shards)
        expect = {"pdparams": "model_state.tp00.pdparams", "safetensors": "model.tp00.safetensors",
                  "sharded": "model.safetensors.index.tp00.json"}[fmt]
        assert expect in names and not any(n in names for n in ("model.safetensors", "model_state.pdparams"))
        out = str(tmp_path / f"merged-{fmt}")
        assert main_tp(["--model_name_or_path", shards, "--merge_model_path", out]) == 0
        merged = read_weights(out)
        assert sorted(merged) == sorted(original)
        for k, v in original.items():
            assert merged[k].dtype == v.dtype and merged[k].shape == v.shape and np.array_equal(merged[k], v), (fmt, k)
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f).get("tensor_parallel_degree", 1) in (1, -1)
        assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))  # saved because the shard folder has one
        with open(os.path.join(out, "paddlellm_meta.json")) as f:
            meta = json.load(f)
        assert meta["family"] == family and meta["kind"] == "base" and meta["merged_tensor_parallel_degree"] == degree
    # the merged folder loads as a single-card model
    from paddlellm.loading import load_for_inference

    m, tok, fam, _ = load_for_inference(out)
    from paddlellm import cpu_kernels

    ref = get_family(family).paddlenlp_class("model_class").from_pretrained(str(tmp_path / "base"))
    ref = cpu_kernels.apply(fam, ref)  # as load_for_inference runs it on CPU: the same code, so bit-identical logits
    ref.eval()
    assert np.array_equal(logits_of(m, tok, fam), logits_of(ref, tok, fam))


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).supports.get("tensor_parallel")])
def test_merge_tp_lora_shards(family, tiny_dir, tmp_path):
    """Sharded LoRA adapters (lora_model_state.tpXX.pdparams) merge back bit-identically and still load."""
    import paddle

    from paddlellm.loading import load_for_inference
    from paddlellm.commands.merge import main_tp

    base = str(tmp_path / "base")
    model = tp_base(family, tiny_dir(family), base)
    lora = make_lora(base, str(tmp_path / "lora"), family, seed=2)
    full = {k: v.numpy() for k, v in paddle.load(os.path.join(lora, "lora_model_state.pdparams")).items()}
    degree = 2
    shards = str(tmp_path / "lora-tp")
    shutil.copytree(lora, shards)
    os.remove(os.path.join(shards, "lora_model_state.pdparams"))
    config = copy.deepcopy(model.config)
    config.tensor_parallel_degree = degree
    owner = {k: k.rsplit(".", 1)[0] + ".weight" for k in full}
    split_any = False
    per_rank = []
    for rank in range(degree):
        actions = split_actions(type(model), config, sorted(set(owner.values())), degree, rank)
        shard = {}
        for k, v in full.items():
            action = actions.get(owner[k])
            column = action is not None and getattr(action, "keywords", {}).get("is_column", True)
            split = action is not None and ((k.endswith("lora_B") and column) or (k.endswith("lora_A") and not column))
            shard[k] = paddle.to_tensor(apply_split(action, v) if split else v)
            split_any |= split
        paddle.save(shard, os.path.join(shards, f"lora_model_state.tp{rank:02d}.pdparams"))
        per_rank.append({k: v.numpy() for k, v in shard.items()})
    assert split_any
    for name in ("lora_config.json", "config.json"):
        path = os.path.join(shards, name)
        with open(path) as f:
            cfg = json.load(f)
        cfg["tensor_parallel_degree"] = degree
        with open(path, "w") as f:
            json.dump(cfg, f)

    out = str(tmp_path / "lora-merged")
    assert main_tp(["--model_name_or_path", shards, "--merge_model_path", out]) == 0
    merged = {k: v.numpy() for k, v in paddle.load(os.path.join(out, "lora_model_state.pdparams")).items()}
    assert sorted(merged) == sorted(full) and all(np.array_equal(merged[k], full[k]) for k in full)

    # By definition: what every rank computes locally (W_r + A_r @ B_r * scaling), merged as PaddleNLP merges
    # the weight, equals the full weight plus the merged adapters' product (fused, re-ordered qkv included).
    weights = read_weights(base)
    cls = type(model)
    merge_map = cls._get_tensor_parallel_mappings(config, is_split=False)
    merge_fns = {real: merge_map[k] for k, real in cls._resolve_prefix_keys(merge_map.keys(), list(weights)).items()}
    splits = [split_actions(cls, config, list(weights), degree, r) for r in range(degree)]
    for a_key in [k for k in full if k.endswith("lora_A")]:
        layer = a_key[: -len(".lora_A")]
        w = weights[layer + ".weight"]
        local = [(apply_split(splits[r][layer + ".weight"], w) if layer + ".weight" in splits[r] else w)
                 + per_rank[r][a_key] @ per_rank[r][layer + ".lora_B"] * 2.0 for r in range(degree)]
        together = merge_fns[layer + ".weight"](local) if layer + ".weight" in merge_fns else local[0]
        expect = w + merged[a_key] @ merged[layer + ".lora_B"] * 2.0  # lora_alpha / r = 8 / 4
        assert np.abs(np.asarray(together) - expect).max() < 1e-5, layer
    adapted, tok, fam, _ = load_for_inference(None, lora_path=lora)
    again, _, _, _ = load_for_inference(out)  # a LoRA folder again (its metadata says so)
    assert np.array_equal(logits_of(adapted, tok, fam), logits_of(again, tok, fam))


# ------------------------------------------------------------------ errors and the scripts themselves
def cli(script, *argv):
    return run_cmd([sys.executable, os.path.join(ROOT, script), *argv], check=False, timeout=300)


def assert_error(proc, expected, out):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip() and not l.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1 and lines[0] == f"error: {expected}", proc.stderr[-3000:]
    assert not os.path.exists(out)
    assert not any(".merging-" in n for n in os.listdir(os.path.dirname(out)))


def test_merge_tp_refuses_a_family_contradicting_the_folder(tiny_dir, tmp_path, capsys):
    """--family opt on llama shards loaded them with OPT's classes; now refused in one line through the
    check predict and merge_lora_params.py use (an agreeing --family still merges)."""
    from paddlellm.commands.merge import main_tp

    base = tmp_path / "base"
    model = tp_base("llama", tiny_dir("llama"), str(base))
    shards = str(tmp_path / "tp")
    write_tp_shards(model, read_weights(str(base)), shards, 2, False, extras_from=str(base))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main_tp(["--model_name_or_path", shards, "--merge_model_path", out, "--family", "opt"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --family opt contradicts model_name_or_path {shards!r}, which records family llama; "
        "drop --family (it is for a model that does not record its family)")
    assert not os.path.exists(out)
    assert main_tp(["--model_name_or_path", shards, "--merge_model_path", out, "--family", "llama", "--device", "cpu"]) == 0
    merged, original = read_weights(out), read_weights(str(base))
    assert sorted(merged) == sorted(original) and all(np.array_equal(merged[k], original[k]) for k in original)


def test_scripts_and_errors(tiny_dir, tmp_path):
    base = tmp_path / "base"
    model = tp_base("llama", tiny_dir("llama"), str(base))
    shards = str(tmp_path / "tp")
    write_tp_shards(model, read_weights(str(base)), shards, 2, False, extras_from=str(base))
    out = str(tmp_path / "out")
    # the real script, end to end
    proc = cli("merge_tp_params.py", "--model_name_or_path", shards, "--merge_model_path", out, "--dtype", "float32",
               "--with_tokenizer", "false", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(read_weights(out)) == sorted(read_weights(str(base)))
    assert not os.path.exists(os.path.join(out, "tokenizer_config.json"))
    shutil.rmtree(out)

    os.remove(os.path.join(shards, "model_state.tp01.pdparams"))
    assert_error(cli("merge_tp_params.py", "--model_name_or_path", shards, "--merge_model_path", out),
                 f"{shards}: shards tp01 are missing (found tp00)", out)
    assert_error(cli("merge_tp_params.py", "--model_name_or_path", str(base), "--merge_model_path", out),
                 f"{base}: no tensor-parallel shards; it holds model.safetensors, a single-card or unified checkpoint that loads as it is", out)
    assert_error(cli("merge_tp_params.py", "--model_name_or_path", str(tmp_path / "none"), "--merge_model_path", out),
                 f"model_name_or_path '{tmp_path / 'none'}': no such folder", out)
    assert_error(cli("merge_tp_params.py", "--model_name_or_path", shards, "--merge_model_path", out, "--dtype", "int8"),
                 "--dtype: dtype must be one of float32, float16, bfloat16, got 'int8'", out)
    assert_error(cli("merge_lora_params.py", "--lora_path", str(base), "--merge_model_path", out),
                 f"lora_path '{base}': no lora_config.json (not a folder saved by a LoRA fine-tuning run)", out)
    assert_error(cli("merge_lora_params.py", "--lora_path", str(base)),
                 "merge_model_path is required: the folder to write the merged model into", out)
    (tmp_path / "afile").write_text("x")
    proc = cli("merge_tp_params.py", "--model_name_or_path", shards, "--merge_model_path", str(tmp_path / "afile" / "m"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: merge_model_path '{tmp_path / 'afile' / 'm'}': can't create it ('{tmp_path / 'afile'}' is a file); choose a writable place")


def test_help_is_fast():
    for command in ("merge-lora", "merge-tp"):
        code = ("import atexit, sys; atexit.register(lambda: print('PADDLE_LOADED' if 'paddle' in sys.modules else 'PADDLE_NOT_LOADED'));"
                f"from paddlellm.cli import main; main(['{command}', '--help'])")
        out = run_cmd([sys.executable, "-c", code]).stdout
        for name in (("--model_name_or_path", "--lora_path", "--merge_model_path", "--device", "--with_tokenizer") if command == "merge-lora"
                     else ("--model_name_or_path", "--merge_model_path", "--dtype", "--with_tokenizer", "--device")):
            assert name in out
        assert out.strip().endswith("PADDLE_NOT_LOADED")
