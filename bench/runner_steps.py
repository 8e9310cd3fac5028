"""Decode-runner time per step (and prompt pass) per family against LLaMA's on the same shape (issue 21's
"ChatGLM, ChatGLM2 and GLM within 1.3x of LLaMA's time per token").

Each family's random model (the tiny tokenizer, 600 pieces) at one shape, loaded as predict loads it; its decode
runner (families/*_decode.py) prefills a batch of prompts of 40 random words (the family's template) and then
runs --steps decode steps; families and batch sizes interleaved, best of --rounds. Shapes:

  bench  generate_families.py's: hidden 512, 4 layers, 8 heads, feed-forward ~1376 (GLM: 4 x hidden, fixed)
  real   the issue's real small checkpoint: hidden 576, 30 layers, 9 heads (LLaMA 3 key/value heads, ChatGLM2 3
         multi-query groups), feed-forward 1536 (GLM: 4 x hidden); vocabulary still the tiny tokenizer's

    python bench/runner_steps.py [--shape bench|real] [--batches 1,8] [--rounds 3] [--steps 24]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

REAL = {
    "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "chatglm_v2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, kv_channels=64, multi_query_group_num=3,
                       ffn_hidden_size=1536),
    "chatglm": dict(hidden_size=576, inner_hidden_size=1536, num_hidden_layers=30, num_attention_heads=9),
    "glm": dict(hidden_size=576, num_layers=30, num_attention_heads=9),
}
WORDS = "one two three four five six seven eight nine ten spell hello there words more and".split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="llama,chatglm_v2,chatglm,glm")
    ap.add_argument("--shape", choices=["bench", "real"], default="bench")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import numpy as np
    import paddle

    from generate_families import SHAPES
    from paddlellm.commands.tiny import build_tiny
    from paddlellm.generation import _generation_inputs
    from paddlellm.loading import load_for_inference

    shapes = REAL if args.shape == "real" else SHAPES
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = {name: load_for_inference(build_tiny(name, os.path.join(tmp, name), **shapes[name]))[:3] for name in families}
        for _ in range(args.rounds):
            for batch in batches:
                for name in families:
                    model, tok, fam = loaded[name]
                    rng = np.random.default_rng(0)
                    prompts = [fam.generation_prompt(tok, [" ".join(rng.choice(WORDS, size=40))], [], 1024) for _ in range(batch)]
                    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, args.steps).items()}
                    runner = fam.decode_runner(model)
                    if runner is None:
                        raise SystemExit(f"{name}: no decode runner for this model")
                    tokens = paddle.to_tensor(rng.integers(3, 100, size=[batch, 1]))
                    with paddle.no_grad():
                        start = time.perf_counter()
                        runner.prefill(inputs, inputs["input_ids"].shape[1] + args.steps)
                        prefill = time.perf_counter() - start
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            runner.step(tokens)
                        step = (time.perf_counter() - start) / args.steps
                    old = best.get((name, batch), (float("inf"), float("inf")))
                    best[(name, batch)] = (min(old[0], prefill), min(old[1], step))
    print(f"shape {args.shape}, best of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5s} {'family':10s} {'prefill ms':>10s} {'step ms':>8s} {'step / LLaMA':>12s}")
    for batch in batches:
        ref = best.get(("llama", batch), (None, None))[1]
        for name in families:
            prefill, step = best[(name, batch)]
            ratio = f"{step / ref:.2f}x" if ref else "-"
            print(f"{batch:5d} {name:10s} {prefill * 1000:10.1f} {step * 1000:8.1f} {ratio:>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
