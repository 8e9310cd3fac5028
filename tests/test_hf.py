"""Hugging Face transformers folders in (every command's model loading) and out (export-hf, merge --output_format hf).

The fixtures under tests/fixtures/hf/ were written by transformers itself (tests/fixtures/make_hf_fixtures.py,
run by hand with torch): tiny random models as transformers saves them, their tokenizers, and the logits
transformers computed for fixed token ids. No torch is needed here.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cmd
from paddlellm.families import get_family

os.environ["PADDLELLM_NO_PROGRESS"] = "1"
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
# fixture folder -> family; the LLaMA weights also come as pytorch_model.bin and as sharded safetensors
READABLE = {"llama": "llama", "llama-bin": "llama", "llama-sharded": "llama", "gpt2": "gpt-3", "opt": "opt", "bloom": "bloom",
            "qwen2": "qwen2"}
EXPORTABLE = {"llama": "llama", "gpt-3": "gpt2", "opt": "opt", "bloom": "bloom", "qwen2": "qwen2"}  # family -> fixture of its architecture


def fixture(name):
    return os.path.join(FIXTURES, name)


def snapshot(folder):
    return {n: (os.path.getsize(os.path.join(folder, n)), os.path.getmtime(os.path.join(folder, n))) for n in os.listdir(folder)}


def raw_logits(model, ids):
    import paddle

    from paddlellm.families import logits_of

    with paddle.no_grad():
        return logits_of(model(input_ids=paddle.to_tensor(ids))).astype("float32").numpy()


def header(path):
    """{name: (dtype, shape)} and metadata of a safetensors file, read from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    meta = h.pop("__metadata__", {})
    return {k: (v["dtype"], v["shape"]) for k, v in h.items()}, meta


def hf_tensors(folder):
    from safetensors.numpy import load_file

    from paddlellm.formats.hf import weight_files

    out = {}
    for f in weight_files(folder):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------ in
@pytest.mark.parametrize("name", list(READABLE))
def test_transformers_folder_loads_with_transformers_logits(name, capfd):
    from paddlellm.formats.hf import is_hf_folder
    from paddlellm.loading import load_for_inference

    folder = fixture(name)
    before = snapshot(folder)
    assert is_hf_folder(folder)
    model, tok, fam, _ = load_for_inference(folder)  # the path predict, serve and quickstart load through
    assert fam.name == READABLE[name]
    ids = np.load(os.path.join(folder, "input_ids.npy"))
    ref = np.load(os.path.join(folder, "logits.npy"))
    assert raw_logits(model, ids).shape == ref.shape
    assert np.abs(raw_logits(model, ids) - ref).max() < 1e-4
    assert "converted it in memory" in capfd.readouterr().err
    with open(os.path.join(folder, "tokens.json")) as f:
        tokens = json.load(f)
    for text, ids in zip(tokens["texts"], tokens["ids"]):
        if fam.tokenizer_kind == "sentencepiece" and text.startswith("  "):
            continue  # transformers 5's LLaMA tokenizer adds a prefix space sentencepiece itself does not (see README)
        assert fam.encode_text(tok, text) == ids, text
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token")}
    assert special == {"llama": {"bos_token": "<s>", "eos_token": "</s>"}, "gpt-3": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
                       "opt": {"bos_token": "</s>", "eos_token": "</s>"}, "bloom": {"bos_token": "<s>", "eos_token": "</s>"},
                       "qwen2": {"bos_token": None, "eos_token": "<|im_end|>"}}[fam.name]
    assert tok.pad_token_id is not None
    assert snapshot(folder) == before  # nothing written into the user's folder


def test_checkpoint_saved_from_the_bare_model_loads(tmp_path):
    """Hub checkpoints such as gpt2 and bloom-560m store names without the head model's prefix (h.0..., not transformer.h.0...)."""
    from safetensors.numpy import save_file

    folder = str(tmp_path / "gpt2")
    shutil.copytree(fixture("gpt2"), folder)
    tensors = hf_tensors(folder)
    save_file({k.split(".", 1)[1]: v for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    ids, ref = np.load(os.path.join(folder, "input_ids.npy")), np.load(os.path.join(folder, "logits.npy"))
    assert np.abs(raw_logits(get_family("gpt-3").load_model(folder), ids) - ref).max() < 1e-4


def test_predict_command_on_a_transformers_folder(tmp_path):
    """predict_generation.py as a user runs it, on the .bin variant: greedy output equals in-process generation."""
    from paddlellm.generation import generate_replies
    from paddlellm.loading import load_for_inference
    from paddlellm.data import Record

    data = tmp_path / "in.json"
    data.write_text(json.dumps({"src": "spell: 4 0 7", "tgt": "four zero seven"}) + "\n")
    out = tmp_path / "out.json"
    proc = run_cmd([sys.executable, "predict_generation.py", "--model_name_or_path", fixture("llama-bin"), "--data_file", str(data),
                    "--output_file", str(out), "--tgt_length", "6", "--src_length", "64"])
    assert "read a transformers LlamaForCausalLM checkpoint" in proc.stderr
    row = json.loads(out.read_text())
    model, tok, fam, _ = load_for_inference(fixture("llama-bin"))
    assert row["output"] == generate_replies(model, tok, fam, [Record(["spell: 4 0 7"], ["four zero seven"], "in.json:1")], 64, 6)[0]


def write_fake(folder, config, tensors=None):
    """A folder shaped like a transformers checkpoint (config.json + torch-format safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors or {"w": np.zeros([2], "float32")}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def test_unreadable_transformers_folders_are_refused_in_one_line(tmp_path, capsys):
    chatglm2 = write_fake(tmp_path / "chatglm2", {"model_type": "chatglm_v2", "architectures": ["ChatGLMModel"]})
    glm4 = write_fake(tmp_path / "glm4", {"model_type": "glm", "architectures": ["GlmForCausalLM"]})
    cfg = json.load(open(fixture("llama") + "/config.json"))
    scaled = write_fake(tmp_path / "yarn", dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 8.0}))
    no_sp = str(tmp_path / "no_sp")
    shutil.copytree(fixture("llama"), no_sp)
    os.remove(os.path.join(no_sp, "tokenizer.model"))
    os.remove(os.path.join(no_sp, "tokenizer.json"))  # with it, LlamaTokenizerFast reads the folder (test_real_checkpoints.py)
    shard = str(tmp_path / "shard")
    shutil.copytree(fixture("llama-sharded"), shard)
    os.remove(os.path.join(shard, "model-00002-of-00003.safetensors"))
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"src": "a", "tgt": "b"}) + "\n")
    cases = [
        (chatglm2, "transformers-format chatglm_v2 checkpoint can't be read: transformers has no ChatGLM2-6B architecture"),
        (glm4, "its own 'glm' model type is GLM-4"),
        (scaled, "rope_parameters rope_type 'yarn' is not supported (paddlellm reproduces 'default', 'linear' and 'llama3')"),
        (no_sp, "needs the sentencepiece model tokenizer.model or a tokenizer.json"),
        (shard, "model-00002-of-00003.safetensors (listed in its index) is missing"),
    ]
    from paddlellm.commands.predict import main as predict

    for folder, words in cases:  # predict_generation.py's entry, in this process (the finetune case below is a real command)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            predict(["--model_name_or_path", folder, "--data_file", str(data), "--output_file", str(tmp_path / "o.json")])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and words in last and last.startswith("error: "), last
        assert not os.path.exists(tmp_path / "o.json")
    proc = run_cmd([sys.executable, "finetune_generation.py", "--model_name_or_path", chatglm2, "--dataset_name_or_path",
                    os.path.join(ROOT, "data"), "--output_dir", str(tmp_path / "ft")], check=False)
    assert proc.returncode == 2 and "chatglm_v2 checkpoint can't be read" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ft")


# ------------------------------------------------------------------ out
@pytest.mark.parametrize("family", list(EXPORTABLE))
def test_export_matches_transformers_layout_and_round_trips(family, tiny_dir, tmp_path):
    """Our model of the fixture's config exports to the same names, shapes, dtypes, tensors and config fields
    transformers wrote; our own tiny model exports and loads back with identical logits."""
    from paddlellm.commands.export_hf import main as main_export
    from paddlellm.formats.hf import export_model, is_hf_folder

    fam = get_family(family)
    ref = fixture(EXPORTABLE[family])
    model, tok = fam.load_model(ref), fam.load_tokenizer(ref)
    out = tmp_path / "out"
    out.mkdir()
    export_model(fam, model, tok, str(out), "float32")
    ours, meta = header(out / "model.safetensors")
    theirs = {}
    for f in os.listdir(ref):
        if f.endswith(".safetensors"):
            theirs.update(header(os.path.join(ref, f))[0])
    assert meta == {"format": "pt"} and ours == theirs
    a, b = hf_tensors(str(out)), hf_tensors(ref)
    assert all(np.array_equal(a[k], b[k]) for k in b)  # transformers' own tensors, bit for bit
    mine, cfg = json.load(open(out / "config.json")), json.load(open(os.path.join(ref, "config.json")))
    assert mine["architectures"] == cfg["architectures"] and mine["model_type"] == cfg["model_type"]
    shared = [k for k in mine if k in cfg and k not in ("torch_dtype", "dtype")]
    assert len(shared) >= 8
    assert {k: mine[k] for k in shared} == {k: cfg[k] for k in shared}

    # our own tiny model (its own config) -> export-hf (the command's function) -> load back: identical logits
    tiny = tiny_dir(family)
    exported = str(tmp_path / "exported")
    assert main_export(["--model_name_or_path", tiny, "--output_path", exported]) == 0
    assert is_hf_folder(exported)
    names = set(os.listdir(exported))
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert ("tokenizer.model" in names) if fam.tokenizer_kind == "sentencepiece" else {"vocab.json", "merges.txt", "tokenizer.json"} <= names
    ids = np.array([[5, 9, 30, 41, 7, 100, 3, 12]])
    m1, m2 = fam.load_model(tiny), fam.load_model(exported)
    assert np.array_equal(raw_logits(m1, ids), raw_logits(m2, ids))
    t1, t2 = fam.load_tokenizer(tiny), fam.load_tokenizer(exported)
    assert fam.encode_text(t1, "spell: 4 0 7, hello") == fam.encode_text(t2, "spell: 4 0 7, hello")
    assert (t1.bos_token, t1.eos_token, t1.pad_token) == (t2.bos_token, t2.eos_token, t2.pad_token)
    if family == "llama":  # size-sharded export: transformers' shard and index names, read back identically
        sharded = tmp_path / "sharded"
        sharded.mkdir()
        export_model(fam, m1, t1, str(sharded), "float32", max_shard_size="100KB")
        index = json.load(open(sharded / "model.safetensors.index.json"))
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0].startswith("model-00001-of-0000") and sorted(os.listdir(sharded)) == sorted(
            shards + ["model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.model",
                      "tokenizer_config.json", "special_tokens_map.json"])
        assert np.array_equal(raw_logits(fam.load_model(str(sharded)), ids), raw_logits(m1, ids))


def test_export_dtype_and_refusals(tiny_dir, tmp_path):
    from paddlellm.merge import export_hf

    base = tiny_dir("llama")
    out = export_hf(base, str(tmp_path / "bf16"), dtype="bfloat16")
    tensors, _ = header(os.path.join(out, "model.safetensors"))
    assert {d for d, _ in tensors.values()} == {"BF16"}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    fam = get_family("llama")
    ids = np.array([[5, 9, 30, 41]])
    diff = np.abs(raw_logits(fam.load_model(out), ids) - raw_logits(fam.load_model(base), ids)).max()
    assert 0 < diff < 0.05  # bfloat16 rounding, nothing worse
    for family in ("chatglm", "chatglm_v2", "glm"):
        proc = run_cmd([sys.executable, "-m", "paddlellm.cli", "export-hf", "--model_name_or_path", tiny_dir(family),
                        "--output_path", str(tmp_path / family)], check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"error: export-hf: the {family} family has no transformers architecture"), proc.stderr
        assert not os.path.exists(tmp_path / family)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_lora_on_a_transformers_folder_then_merge_and_export(name, tmp_path):
    """finetune --lora on a transformers LLaMA / Qwen2 folder -> merge_lora_params.py --output_format hf and
    export-hf of the LoRA output -> both load again and give the logits of base + adapters."""
    from paddlellm.formats.hf import is_hf_folder
    from paddlellm.loading import load_for_inference

    base = fixture(name)
    before = snapshot(base)
    ft = str(tmp_path / "lora")
    run_cmd([sys.executable, "finetune_generation.py", "--model_name_or_path", base, "--dataset_name_or_path", os.path.join(ROOT, "data"),
             "--output_dir", ft, "--lora", "true", "--lora_rank", "4", "--learning_rate", "5e-2", "--per_device_train_batch_size", "4",
             "--max_steps", "3", "--evaluation_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
             "--src_length", "24", "--tgt_length", "8", "--seed", "1"])
    merged = str(tmp_path / "merged")
    exported = str(tmp_path / "exported")
    run_cmd([sys.executable, "merge_lora_params.py", "--lora_path", ft, "--merge_model_path", merged, "--output_format", "hf"])
    run_cmd([sys.executable, "-m", "paddlellm.cli", "export-hf", "--model_name_or_path", ft, "--output_path", exported])
    assert snapshot(base) == before
    ids = np.load(os.path.join(base, "input_ids.npy"))
    adapted, _, _, _ = load_for_inference(ft)
    want = raw_logits(adapted, ids)
    assert np.abs(want - np.load(os.path.join(base, "logits.npy"))).max() > 1e-3  # the adapters changed the model
    for folder in (merged, exported):
        assert is_hf_folder(folder) and not any(n.startswith(".") for n in os.listdir(folder))
        model, tok, fam, _ = load_for_inference(folder)
        assert np.abs(raw_logits(model, ids) - want).max() < 1e-5
    assert hf_tensors(merged).keys() == hf_tensors(base).keys()
