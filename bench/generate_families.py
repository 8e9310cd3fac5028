"""Decode speed of every family, CPU kernels off against on (what issue 15's per-family profile asks).

For each family: a random model of about the benchmark's size (hidden 512, 4 layers, 8 heads, feed-forward
~1376; the tiny tokenizer's vocabulary, so the output head is small) saved as a model folder, loaded twice
the way predict loads it -- once with PADDLELLM_CPU_KERNELS=0 (paddlenlp's model as it is, paddle's defaults,
the model's own forward in the decode loop) and once with the default (the family's CPU patches, paddle's
stride kernels off while generating, the family's decode runner where it has one) -- and both generate
greedy replies for the same 16 prompts (log-normal lengths, median ~48, up to 200 tokens) in length-bucketed
batches of 8, 32 new tokens each. Arms interleaved, best of --rounds; the replies of both arms must be equal.

With --arms runner both arms have the CPU kernels on and only the family's decode runner differs: *off* has
family.decode_runner return None (the decode loop drives the model's own forward, cache concatenated each step),
*on* is the default (KV cache written in place, families/*_decode.py).

    python bench/generate_families.py [--families llama,bloom] [--rounds 2] [--out bench/results/generate_families.json]
    python bench/generate_families.py --arms runner --families llama,gpt-3,opt,bloom   # -> generate_families_runners.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# each family's config names for hidden 512, 4 layers, 8 heads, feed-forward ~1376
SHAPES = {
    "llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "chatglm": dict(hidden_size=512, inner_hidden_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "chatglm_v2": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, kv_channels=64, multi_query_group_num=2,
                       ffn_hidden_size=1376),
    "bloom": dict(hidden_size=512, n_layer=4, n_head=8),
    "gpt-3": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "opt": dict(hidden_size=512, word_embed_proj_dim=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "glm": dict(hidden_size=512, num_layers=4, num_attention_heads=8),
}
OFF = "PADDLELLM_CPU_KERNELS"


def build(family, tmp: str) -> str:
    """A bench-sized random model folder of the family (its tiny tokenizer, seeded weights)."""
    from paddlellm.commands.tiny import build_tiny

    return build_tiny(family.name, os.path.join(tmp, "model"), **SHAPES[family.name])


def run(model, tok, family, prompts, new_tokens):
    from paddlellm.generation import generate_ids, length_buckets

    replies = [None] * len(prompts)
    start = time.perf_counter()
    for idx in length_buckets([len(p) for p in prompts], 8):
        for i, ids in zip(idx, generate_ids(model, tok, family, [prompts[i] for i in idx], new_tokens)):
            replies[i] = ids
    seconds = time.perf_counter() - start
    return sum(len(r) for r in replies) / seconds, replies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--arms", choices=["kernels", "runner"], default="kernels",
                    help="kernels: PADDLELLM_CPU_KERNELS=0 against the default; runner: the decode runner off against on")
    ap.add_argument("--out", default=None, help="default bench/results/generate_families.json "
                                                "(generate_families_runners.json with --arms runner)")
    args = ap.parse_args()
    runner_arms = args.arms == "runner"
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("generate_families_runners.json" if runner_arms else "generate_families.json"))

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import numpy as np

    from paddlellm.families import get_family
    from paddlellm.loading import load_for_inference

    sys.path.insert(0, str(REPO / "bench"))
    from generate_throughput import prompt_lengths

    lengths = [min(n, 200) for n in prompt_lengths(16, 200, seed=1)]
    results = {}
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        family = get_family(name)
        with tempfile.TemporaryDirectory() as tmp:
            folder = build(family, tmp)
            if not runner_arms:
                os.environ[OFF] = "0"
            plain, tok, _, _ = load_for_inference(folder)
            os.environ.pop(OFF, None)
            patched, _, _, _ = load_for_inference(folder)
            # prompts as predict builds them (the family's template and special tokens: ChatGLM needs its gMASK),
            # from n random words each
            rng = np.random.default_rng(0)
            words = "one two three four five six seven eight nine ten spell hello there words more and".split()
            prompts = [family.generation_prompt(tok, [" ".join(rng.choice(words, size=n))], [], 1024) for n in lengths]
            best = {"off": 0.0, "on": 0.0}
            same = True
            for r in range(args.rounds):
                if runner_arms:
                    family.decode_runner = lambda model: None  # this instance only: the model's own forward
                else:
                    os.environ[OFF] = "0"
                off, replies_off = run(plain, tok, family, prompts, args.new_tokens)
                os.environ.pop(OFF, None)
                family.__dict__.pop("decode_runner", None)
                on, replies_on = run(patched, tok, family, prompts, args.new_tokens)
                same = same and replies_on == replies_off
                best = {"off": max(best["off"], off), "on": max(best["on"], on)}
                print(f"round {r + 1}  {name:10s}  off {off:7.1f}  on {on:7.1f} tokens/s  same replies: {replies_on == replies_off}", flush=True)
            runner = family.decode_runner(patched) is not None
            results[name] = {"prompt_tokens": sum(len(p) for p in prompts),
                             "off_tokens_per_s": round(best["off"], 1), "on_tokens_per_s": round(best["on"], 1),
                             "on_over_off": round(best["on"] / best["off"], 2), "same_replies": same,
                             "decode_runner": runner, "cpu_patches": list(family.cpu_patches)}
            del plain, patched
    print(f"\n{'family':10s} {'off':>8s} {'on':>8s} {'on/off':>7s}  runner  same replies")
    for name, r in results.items():
        print(f"{name:10s} {r['off_tokens_per_s']:8.1f} {r['on_tokens_per_s']:8.1f} {r['on_over_off']:6.2f}x  "
              f"{'yes' if r['decode_runner'] else 'no ':6s}  {r['same_replies']}")
    import datetime
    import platform

    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
           "threads": os.environ.get("OMP_NUM_THREADS"), "prompts": lengths, "batch": 8, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "arms": args.arms, "load_average_at_end": os.getloadavg(), "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"saved {args.out}")
    return 0 if all(r["same_replies"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
