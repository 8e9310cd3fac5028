"""Shared fixtures: tiny models are built once per test session (one per family, on demand)."""
import json
import os
import subprocess
import sys

import pytest

# The environment before paddle is imported in this process (paddle's import sets OMP_NUM_THREADS=1,
# which would make every subprocess single-threaded); commands under test get this one.
BASE_ENV = dict(os.environ)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "chatglm", "chatglm_v2", "bloom", "gpt-3", "opt", "glm", "qwen2"]

# Must be set before paddle is imported anywhere in the test process.
os.environ.setdefault("PADDLELLM_CPU_TUNING", "1")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a tiny random checkpoint of that family, built once per session."""
    from paddlellm.commands.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_tiny(family, str(root / family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """name -> (tiny model, tokenizer, family), loaded as predict loads them, once per family and test module."""
    from paddlellm.loading import load_for_inference

    cache = {}

    def get(name):
        if name not in cache:
            model, tok, fam, _ = load_for_inference(tiny_dir(name))
            cache[name] = (model, tok, fam)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def llama(tiny_dir):
    """The tiny LLaMA's folder (the model the server tests serve)."""
    return tiny_dir("llama")


# One training step on four examples of mixed lengths (test_packing, test_cpu_kernels compare its weights).
STEP_DATA = [
    {"src": "spell: 1", "tgt": "one two three four five six seven eight nine"},
    {"src": "spell: 2 3 4 5 6", "tgt": "two"},
    {"src": ["hello", "spell: 7 8"], "tgt": ["hi", "seven eight"]},
    {"src": "spell: 9 0", "tgt": "nine zero nine zero"},
]
# Adam's first step is lr * g / (|g| + eps): with eps=1 the update depends on the gradient's scale, so a
# wrong normalisation shows up in the weights; no clipping, no warm-up, no shuffling effects (one step).
ONE_STEP = ["--max_steps", "1", "--learning_rate", "0.5", "--adam_epsilon", "1.0", "--max_grad_norm", "0",
            "--logging_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
            "--src_length", "32", "--tgt_length", "16", "--seed", "3", "--warmup_steps", "0"]


@pytest.fixture(scope="session")
def step_data(tmp_path_factory):
    """A dataset folder (train.json = dev.json = STEP_DATA) for one-step fine-tuning comparisons."""
    d = tmp_path_factory.mktemp("stepdata")
    for name in ("train.json", "dev.json"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in STEP_DATA))
    return str(d)


def run_cmd(args, cwd=ROOT, env=None, timeout=600, check=True):
    """Run a command the way a user would; returns CompletedProcess with text output."""
    full_env = dict(BASE_ENV)
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc
