"""Pieces the benchmark scripts share: the machine they ran on, its float32 matmul throughput, saving a report."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from paddlellm import cpu_runtime  # noqa: E402  (stdlib only, safe before paddle)


def matmul_gflops(reps: int, n: int = 1024) -> float:
    """Best-of-`reps` GFLOP/s of an n x n float32 matmul (imports paddle: set the CPU runtime first)."""
    import paddle

    a, b = paddle.randn([n, n], dtype="float32"), paddle.randn([n, n], dtype="float32")
    for _ in range(3):
        (a @ b).numpy()  # .numpy() waits for the result
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        (a @ b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine_info() -> dict:
    """CPU, usable cores, Python and paddle versions, and the date: recorded with every figure."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for dist in ("paddlepaddle", "paddlenlp"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_model": cpu_runtime._cpuinfo_field(text, "model name") or platform.processor(),
        "cpu_vendor": cpu_runtime._cpuinfo_field(text, "vendor_id"),
        "avx2": "avx2" in (cpu_runtime._cpuinfo_field(text, "flags") or "").split(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cpu_runtime.usable_cpu_count(),
        "python": platform.python_version(),
        "paddle_version": versions["paddlepaddle"],
        "paddlenlp_version": versions["paddlenlp"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_report(path, report: dict) -> Path:
    """Write a benchmark's report as indented JSON (making its folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


# ------------------------------------------------------------------ families and shapes (issue 21)
# The benches' --family names: the registry's, with "gpt" for the registry's "gpt-3".
FAMILIES = ("llama", "bloom", "opt", "gpt", "qwen2", "chatglm", "chatglm_v2", "glm")
ALIASES = {"gpt": "gpt-3"}
# small: the benches' historical LLaMA shape; real: a small real checkpoint's (SmolLM-135M-like), GQA and tied
# embeddings where the family's config has them.
SHAPES = {
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=8000, tied=False, max_positions=512),
    "real": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True, max_positions=1024),
}
# Families whose feed-forward is gated (three matrices: gate, up, down); the others have two.
GATED = {"llama", "qwen2", "chatglm_v2"}


def registry_name(family: str) -> str:
    """The family registry's name of a bench --family value."""
    return ALIASES.get(family, family)


def family_config(family: str, shape: str) -> dict:
    """Config overrides for `paddlellm tiny` (build_tiny) giving `family` the bench shape, in the family's own keys.

    Settings a family's config does not have are left at the architecture's own value (and reported by
    shape_of): Bloom and GLM have a fixed 4x feed-forward; only LLaMA, Qwen2 and ChatGLM2 have fewer key/value
    heads; Bloom, OPT, GPT, ChatGLM and GLM always tie the output head to the embeddings, ChatGLM2 never."""
    s = SHAPES[shape]
    name = registry_name(family)
    h, L, n, kv, i, pos = s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["intermediate"], s["max_positions"]
    if name in ("llama", "qwen2"):
        cfg = dict(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=n, num_key_value_heads=kv,
                   tie_word_embeddings=s["tied"], max_position_embeddings=pos)
        if name == "qwen2":
            cfg["seq_length"] = pos
        return cfg
    if name == "bloom":
        return dict(hidden_size=h, n_layer=L, n_head=n)
    if name == "opt":
        return dict(hidden_size=h, word_embed_proj_dim=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=n,
                    max_position_embeddings=pos)
    if name == "gpt-3":
        return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=n, max_position_embeddings=pos,
                    seq_length=pos)
    if name == "chatglm":
        return dict(hidden_size=h, inner_hidden_size=i, num_hidden_layers=L, num_attention_heads=n, max_sequence_length=pos)
    if name == "chatglm_v2":
        return dict(hidden_size=h, ffn_hidden_size=i, num_hidden_layers=L, num_attention_heads=n, multi_query_group_num=kv,
                    max_sequence_length=pos)
    if name == "glm":
        return dict(hidden_size=h, num_layers=L, num_attention_heads=n, max_sequence_length=pos)
    raise ValueError(f"--family {family}: choose one of {', '.join(FAMILIES)}")


def shape_of(family: str, shape: str) -> dict:
    """The shape the family's model really has under family_config (for FLOP counts and the reports)."""
    s = dict(SHAPES[shape])
    name = registry_name(family)
    if name in ("bloom", "glm"):
        s["intermediate"] = 4 * s["hidden"]
    if name not in ("llama", "qwen2", "chatglm_v2"):
        s["kv_heads"] = s["heads"]
    if name == "chatglm_v2":
        s["tied"] = False
    elif name not in ("llama", "qwen2"):
        s["tied"] = True
    s["gated_ffn"] = name in GATED
    return s


def matmul_weights(family: str, shape: str, supervised: float = 1.0) -> float:
    """Weights used in matmuls per token: attention and feed-forward projections of every layer, plus the output
    head for the `supervised` share of tokens (the embedding is a lookup)."""
    s = shape_of(family, shape)
    h, L, i, V = s["hidden"], s["layers"], s["intermediate"], s["vocab"]
    attn = 2 * h * h + 2 * h * (h * s["kv_heads"] // s["heads"])
    ffn = (3 if s["gated_ffn"] else 2) * h * i
    return L * (attn + ffn) + h * V * supervised


def has_peer(family: str) -> bool:
    """Whether transformers has the family's architecture (paddlellm export-hf writes it)."""
    from paddlellm.families import get_family

    return bool(get_family(registry_name(family)).hf_architecture)


def build_model(family: str, shape: str, out_dir: str, seed: int = 1234) -> str:
    """A random model folder of `family` at the bench `shape`, with a tokenizer of the shape's vocabulary
    (paddlellm tiny's builder: the family's own tokenizer trained on the bundled corpus, reserved tokens
    filling the rest), built in this process. Returns out_dir."""
    from paddlellm.commands.tiny import build_tiny

    return build_tiny(registry_name(family), out_dir, vocab_size=SHAPES[shape]["vocab"], seed=seed,
                      **family_config(family, shape))


def export_hf(model_dir: str, out_dir: str) -> str:
    """`paddlellm export-hf` of a model folder, in a child process as a user runs it; returns out_dir."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "paddlellm.cli", "export-hf", "--model_name_or_path", model_dir,
                           "--output_path", out_dir, "--dtype", "float32"], capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"paddlellm export-hf {model_dir} failed:\n{proc.stderr[-3000:]}")
    return out_dir


def bench_words(tokenizer) -> list:
    """Words the tokenizer holds as single pieces (a sentencepiece '\u2581word' or byte-level 'Ġword'), so that a
    text of k of them encodes to about k tokens."""
    words = sorted({p[1:] for p in tokenizer.get_vocab() if p[:1] in ("\u2581", "\u0120") and p[1:].isalpha() and len(p) > 2})
    if len(words) < 50:  # a tokenizer without such markers: the bundled corpus's words
        from paddlellm.tokenizer_training import corpus_lines

        words = sorted({w for line in corpus_lines() for w in line.split() if w.isalpha() and len(w) > 2})
    return words


def default_out(bench: str, family, shape) -> Path:
    """bench/results/<bench>.json for the default run (no --family, no --shape), else <bench>_<family>_<shape>.json."""
    if family is None and shape is None:
        return REPO / "bench" / "results" / f"{bench}.json"
    return REPO / "bench" / "results" / f"{bench}_{family or 'llama'}_{shape or 'small'}.json"
