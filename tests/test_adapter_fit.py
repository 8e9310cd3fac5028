"""An adapter on a base it was not trained on, and a --family that contradicts a folder, are refused in one line
by predict, merge and serve (load_for_inference), before anything is loaded or written; a fitting pair still loads."""
import os
import sys

import pytest

from conftest import ROOT, run_cmd
from test_predict import DATA, assert_error, make_lora, make_prefix, predict, read_jsonl, write_jsonl

os.environ["PADDLELLM_NO_PROGRESS"] = "1"


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    """Bases of three families plus a LLaMA of other shapes, and adapters trained on tiny LLaMA and GLM."""
    from paddlellm.commands.tiny import build_tiny

    root = tmp_path_factory.mktemp("fit")
    llama = tiny_dir("llama")
    return {
        "llama": llama,
        "opt": tiny_dir("opt"),
        "chatglm": tiny_dir("chatglm"),
        "llama_wide": build_tiny("llama", str(root / "llama_wide"), hidden_size=128, num_hidden_layers=2, seed=3),
        "lora_llama": make_lora(llama, str(root / "lora_llama"), "llama", seed=1),
        "prefix_llama": make_prefix(llama, str(root / "prefix_llama"), "llama", seed=1),
        "lora_glm": make_lora(tiny_dir("glm"), str(root / "lora_glm"), "glm", seed=1),
    }


def cli(script, *argv):
    return run_cmd([sys.executable, os.path.join(ROOT, script), *argv], check=False, timeout=180)


REFUSE = "pass --model_name_or_path with the base model the adapter was trained on"


def mismatches(f):
    """(base, adapter flag, adapter, expected error) for every kind of mismatch."""
    return [
        (f["opt"], "--lora_path", f["lora_llama"], f"the base is opt ({f['opt']}); the adapter was trained on llama ({f['lora_llama']}): {REFUSE}"),
        (f["chatglm"], "--lora_path", f["lora_glm"], f"the base is chatglm ({f['chatglm']}); the adapter was trained on glm ({f['lora_glm']}): {REFUSE}"),
        (f["llama_wide"], "--lora_path", f["lora_llama"],
         f"the adapter {f['lora_llama']!r} was trained on a base of other shapes than {f['llama_wide']!r} "
         f"(hidden_size 64 there, 128 here): {REFUSE}"),
        (f["llama_wide"], "--prefix_path", f["prefix_llama"],
         f"the adapter {f['prefix_llama']!r} was trained on a base of other shapes than {f['llama_wide']!r} (hidden_size 64 there, 128 here): {REFUSE}"),
    ]


def test_predict_refuses_adapter_of_another_base(folders, tmp_path):
    data = write_jsonl(tmp_path / "data.json", DATA[:2])
    out = str(tmp_path / "out.json")
    for base, flag, adapter, expected in mismatches(folders):
        assert_error(cli("predict_generation.py", "--model_name_or_path", base, flag, adapter, "--data_file", data, "--output_file", out),
                     expected, out)
    assert sorted(os.listdir(tmp_path)) == ["data.json"]


def test_merge_refuses_adapter_of_another_base(folders, tmp_path):
    out = str(tmp_path / "merged")
    for base, flag, adapter, expected in mismatches(folders):
        if flag == "--lora_path":
            assert_error(cli("merge_lora_params.py", "--model_name_or_path", base, "--lora_path", adapter, "--merge_model_path", out),
                         expected, out)
    assert os.listdir(tmp_path) == []  # no merged model of random weights, no staging folder


def test_finetune_refuses_adapter_of_another_base(folders, tmp_path):
    """finetune_generation.py --lora_path (continue training an adapter): the same check, before output_dir exists."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.json", DATA[:2])
    out = str(tmp_path / "run")
    base, _, adapter, expected = mismatches(folders)[0]
    assert_error(cli("finetune_generation.py", "--model_name_or_path", base, "--lora", "true", "--lora_path", adapter,
                     "--dataset_name_or_path", str(data), "--output_dir", out), expected, out)


def test_serve_loader_refuses_and_fitting_pairs_load(folders):
    """flask_server.py loads through load_for_inference: the same refusal; the adapters on their own base still load."""
    from paddlellm.arguments import UserError
    from paddlellm.loading import load_for_inference

    for base, flag, adapter, expected in mismatches(folders):
        with pytest.raises(UserError) as e:
            load_for_inference(base, **{flag[2:]: adapter})
        assert str(e.value) == expected
    with pytest.raises(UserError) as e:  # a model name: its family is told by the name
        load_for_inference("facebook/opt-125m", lora_path=folders["lora_llama"])
    assert str(e.value) == f"the base is opt (facebook/opt-125m); the adapter was trained on llama ({folders['lora_llama']}): {REFUSE}"
    model, _, family, _ = load_for_inference(folders["llama"], lora_path=folders["lora_llama"])
    assert family.name == "llama" and type(model).__name__ == "LoRAModel"
    model, _, family, _ = load_for_inference(None, prefix_path=folders["prefix_llama"])  # base read from the adapter
    assert family.name == "llama" and type(model).__name__ == "PrefixModelForCausalLM"


def test_family_option_contradicting_a_folder(folders, tmp_path):
    data = write_jsonl(tmp_path / "data.json", DATA[:2])
    out = str(tmp_path / "out.json")
    llama = folders["llama"]
    assert_error(cli("predict_generation.py", "--model_name_or_path", llama, "--family", "glm", "--data_file", data, "--output_file", out),
                 f"--family glm contradicts model_name_or_path {llama!r}, which records family llama; "
                 "drop --family (it is for a model that does not record its family)", out)
    lora = folders["lora_llama"]
    assert_error(cli("merge_lora_params.py", "--lora_path", lora, "--family", "opt", "--merge_model_path", str(tmp_path / "m")),
                 f"--family opt contradicts lora_path {lora!r}, which records family llama; "
                 "drop --family (it is for a model that does not record its family)", str(tmp_path / "m"))
    # The same family is no contradiction.
    assert predict("--model_name_or_path", llama, "--family", "llama", "--data_file", data, "--output_file", out, "--tgt_length", "2") == 0
    assert len(read_jsonl(out)) == 2
    assert "A folder that records another family is refused" in " ".join(cli("predict_generation.py", "--help").stdout.split())
