"""Batch-prediction throughput: generated tokens/s, length-bucketed batches against in-order batches.

A mid-size LLaMA (hidden 512, 4 layers, 8 heads, vocab 8000; random weights) generates greedy replies
for prompts whose lengths follow a long-tailed (log-normal) spread, as real instruction data does: most
prompts are short, a few are long. Each setting runs the code path of predict_generation.py
(`paddlellm.predict.plan_batches` + `paddlellm.generation.generate_ids`: left padding, attention mask,
KV cache) at batch 1, 8 and 32, with batches formed
  in order -- consecutive prompts, as PaddleNLP's predict_generation.py batches them;
  bucketed -- prompts of similar length together (what predict_generation.py does).
Greedy decoding makes both produce the same replies, so tokens/s compares like with like.

Static arm: the same model exported with export_model.py (one step program run by paddle.inference behind
paddlenlp's generate(), `--mode static`) generates the same bucketed batches in the same process, and
must give the same replies. Peak memory (RSS) of each mode is measured in a fresh process per mode
(load + the batch-8 run), since a process's peak can only grow.

    python bench/generate_throughput.py [--prompts 64] [--new_tokens 32] [--out bench/results/generate_throughput.json]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, max_position_embeddings=512)
BATCHES = (1, 8, 32)


def prompt_lengths(n: int, longest: int, seed: int = 0):
    """Long-tailed prompt lengths: log-normal with median ~48 tokens, clipped to [4, longest]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(mean=np.log(48), sigma=0.9, size=n), 4, longest).round()]


def build(tmp: str):
    """Model (random weights) + a real LLaMA tokenizer (for pad/eos ids and the family's stop rule)."""
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from paddlellm.families import get_family
    from paddlellm.tiny import build_tokenizer

    family = get_family("llama")
    tokenizer = build_tokenizer(family, tmp, 600)
    paddle.seed(0)
    config = LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer, family


def run_plan(model, tokenizer, family, prompts, batch_size, bucket, new_tokens):
    from paddlellm.generation import generate_ids
    from paddlellm.predict import plan_batches

    lengths = [len(p) for p in prompts]
    plan = plan_batches(lengths, batch_size, bucket=bucket)
    padded = sum(max(lengths[i] for i in idx) * len(idx) for idx in plan)
    replies = [None] * len(prompts)
    start = time.perf_counter()
    for idx in plan:
        for i, ids in zip(idx, generate_ids(model, tokenizer, family, [prompts[i] for i in idx], new_tokens)):
            replies[i] = ids
    seconds = time.perf_counter() - start
    tokens = sum(len(r) for r in replies)
    return {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
            "prompt_tokens": sum(lengths), "padded_prompt_tokens": padded,
            "padding_fraction": round(1 - sum(lengths) / padded, 3)}, replies


def export_static(model, tokenizer, tmp: str) -> str:
    """Save the model as a model folder, export it with export_model.py's code; returns the export folder."""
    from paddlellm.export import main as export_main

    folder, out = os.path.join(tmp, "model"), os.path.join(tmp, "static")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert export_main(["--model_name_or_path", folder, "--output_path", out]) == 0
    return out


def peak_rss_child(path: str, prompts_file: str, new_tokens: int) -> None:
    """(Run in a fresh process.) Load `path` in its mode, generate the batch-8 plan, print the peak RSS in MB."""
    import json

    from paddlellm.loading import load_for_inference
    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    with open(prompts_file) as f:
        prompts = json.load(f)
    model, tokenizer, family, _ = load_for_inference(path)
    run_plan(model, tokenizer, family, prompts, 8, True, new_tokens)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a forked child's ru_maxrss.
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"PEAK_RSS_MB {hwm_kb / 1024:.1f}")


def peak_rss(path: str, prompts, new_tokens: int, tmp: str) -> float:
    import json
    import subprocess

    prompts_file = os.path.join(tmp, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump(prompts, f)
    out = subprocess.run([sys.executable, __file__, "--peak_rss_of", path, "--prompts_file", prompts_file, "--new_tokens", str(new_tokens)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("PEAK_RSS_MB")[-1].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generate_throughput.json"))
    parser.add_argument("--peak_rss_of", help=argparse.SUPPRESS)  # internal: the per-mode memory child
    parser.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_of:
        peak_rss_child(args.peak_rss_of, args.prompts_file, args.new_tokens)
        return 0

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import numpy as np

    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    model, tokenizer, family = build(tmp)
    lengths = prompt_lengths(args.prompts, MODEL["max_position_embeddings"] - args.new_tokens)
    rng = np.random.default_rng(1)
    low = max(tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) + 1
    prompts = [[tokenizer.bos_token_id] + rng.integers(low, len(tokenizer), n - 1).tolist() for n in lengths]
    run_plan(model, tokenizer, family, prompts[:4], 4, True, 4)  # warm-up

    # The static arm: the same model exported with export_model.py's code (export and warm-up untimed).
    from paddlellm.static_runtime import load_static

    static_dir = export_static(model, tokenizer, tmp)
    static_model, _ = load_static(static_dir, family)
    run_plan(static_model, tokenizer, family, prompts[:4], 4, True, 4)  # warm-up

    load_before = os.getloadavg()[0]  # other work on the machine skews timings: recorded with the figures
    results = []
    static_rows = []
    for batch in BATCHES:
        modes = (("in order", False), ("bucketed", True)) if batch > 1 else (("in order", False),)
        replies = {}
        for name, bucket in modes:
            row, replies[name] = run_plan(model, tokenizer, family, prompts, batch, bucket, args.new_tokens)
            row.update(batch_size=batch, batching=name if batch > 1 else "any (batch 1)")
            results.append(row)
            print(f"batch {batch:>2}  {row['batching']:<14}  {row['tokens_per_second']:>7.1f} tokens/s  "
                  f"({row['generated_tokens']} tokens in {row['seconds']:.1f} s, padding {100 * row['padding_fraction']:.0f}% of prompt slots)",
                  flush=True)
        if len(replies) == 2:
            same = sum(a == b for a, b in zip(*replies.values()))
            print(f"           same replies in both orders: {same}/{len(prompts)}")
        # Static arm right after the dynamic bucketed run of the same batch size (closest in machine load).
        dyn, dyn_replies = results[-1], replies[modes[-1][0]]
        row, static_replies = run_plan(static_model, tokenizer, family, prompts, batch, True, args.new_tokens)
        replies = static_replies
        row.update(batch_size=batch, batching="bucketed" if batch > 1 else "any (batch 1)", mode="static",
                   same_replies_as_dynamic=sum(a == b for a, b in zip(replies, dyn_replies)),
                   speedup_vs_dynamic=round(row["tokens_per_second"] / dyn["tokens_per_second"], 2))
        static_rows.append(row)
        print(f"batch {batch:>2}  static (bucketed) {row['tokens_per_second']:>5.1f} tokens/s  ({row['speedup_vs_dynamic']:.2f}x dynamic; "
              f"same replies {row['same_replies_as_dynamic']}/{len(prompts)})", flush=True)
    memory = {"dynamic": peak_rss(os.path.join(tmp, "model"), prompts, args.new_tokens, tmp),
              "static": peak_rss(static_dir, prompts, args.new_tokens, tmp)}
    print(f"peak RSS (fresh process, load + batch-8 run): dynamic {memory['dynamic']:.0f} MB, static {memory['static']:.0f} MB")
    out = {
        "benchmark": "generate_throughput",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "versions": {p: importlib.metadata.version(p) for p in ("paddlepaddle", "paddlenlp")},
        "model": MODEL,
        "prompts": {"count": len(prompts), "lengths": lengths, "median": int(np.median(lengths)), "max": max(lengths),
                    "distribution": "log-normal, median 48, sigma 0.9"},
        "new_tokens": args.new_tokens,
        "decoding": "greedy, KV cache, left padding + attention mask",
        "results": results,
        "static": {"what": "export_model.py step program via paddle.inference behind generate(), bucketed batches",
                   "results": static_rows, "peak_rss_mb": memory},
    }
    tmpdir.cleanup()
    from benchlib import save_report

    save_report(args.out, out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
