"""Runner prefill against the model's own forward, and where a decode step's time goes, at a real small shape
(issue 21): LLaMA (or Qwen2) hidden 576, 30 layers, 9 heads with 3 key/value heads, intermediate 1536, vocabulary
49152, tied embeddings, built with `paddlellm tiny` overrides.

In one process, interleaved, best of --rounds, for batch sizes --batches (prompts of --prompt tokens; at batch > 1
row r is left-padded by 3r, so the runner prefills the rows in chunks of similar length):
  forward   the model's own forward over the prompt (inside generating(): last-position logits, as the loop runs it)
  prefill   the decode runner's prefill of the same prompt (logits compared with the forward's)
  step      one runner decode step (mean of --steps after the first; capacity prompt + --new_tokens)
  head      the step's output head alone (final norm + lm_head on [B, 1, h])
  step/nocopy, head/nocopy   the same with decode_core.HEAD_COPY_MIN out of reach (the tied head's product on the
            transposed embedding, as before the runner kept its [h, vocab] copy)

Times are the process's CPU time (--clock cpu, the default: on a shared machine it counts the work, not the
waiting; run with OMP_NUM_THREADS=1 so spinning threads do not count) or wall time (--clock wall).

    OMP_NUM_THREADS=1 python bench/runner_profile.py [--family llama|qwen2] [--batches 1,8] [--rounds 3]
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

REAL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            tie_word_embeddings=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llama")
    ap.add_argument("--model", default=None, help="an existing folder (else built in a temporary folder)")
    ap.add_argument("--vocab_size", type=int, default=49152)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64, help="the runner's capacity is prompt + this (>= --steps)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import numpy as np
    import paddle

    from paddlellm.commands.tiny import build_tiny
    from paddlellm.families import decode_core
    from paddlellm.cpu_kernels import generating
    from paddlellm.loading import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_tiny(args.family, os.path.join(tmp, args.family), args.vocab_size, **REAL)
        model, _, fam, _ = load_for_inference(folder)
    saved = decode_core.HEAD_COPY_MIN
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    best: dict = {}
    worst_diff = 0.0
    for _ in range(args.rounds):
        for batch in batches:
            ids = rng.integers(3, 500, size=[batch, args.prompt])
            mask = np.ones_like(ids)
            for row in range(1, batch):  # mixed lengths, left padded, as a batch of real prompts
                mask[row, : row * 3] = 0
                ids[row, : row * 3] = 0
            inputs = {"input_ids": paddle.to_tensor(ids), "attention_mask": paddle.to_tensor(mask)}
            positions = paddle.to_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
            times = {}
            with paddle.no_grad(), generating():
                start = clock()
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions,
                            use_cache=True, return_dict=True)
                times["forward"] = clock() - start
                for arm, copy_min in (("", saved), ("/nocopy", 10 ** 9)):
                    decode_core.HEAD_COPY_MIN = copy_min
                    runner = fam.decode_runner(model)
                    start = clock()
                    logits = runner.prefill(dict(inputs, position_ids=positions), args.prompt + max(args.steps, args.new_tokens))
                    if not arm:
                        times["prefill"] = clock() - start
                    worst_diff = max(worst_diff, float((logits - out.logits[:, -1, :]).abs().max()))
                    tokens = paddle.to_tensor(rng.integers(3, 500, size=[batch, 1]))
                    runner.step(tokens)  # the first step (it may set up the step's pieces, e.g. a tied head's copy)
                    start = clock()
                    for _ in range(args.steps):
                        runner.step(tokens)
                    times["step" + arm] = (clock() - start) / args.steps
                    hidden = paddle.randn([batch, 1, REAL["hidden_size"]])
                    start = clock()
                    for _ in range(args.steps):
                        runner._logits(hidden)
                    times["head" + arm] = (clock() - start) / args.steps
                decode_core.HEAD_COPY_MIN = saved
            for k, v in times.items():
                best[(batch, k)] = min(best.get((batch, k), float("inf")), v)
    print(f"{args.family} real shape, {args.clock} time, vocab {args.vocab_size}, prompt {args.prompt}, best of {args.rounds} rounds, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load average {os.getloadavg()[0]:.1f}; "
          f"largest |runner - forward| logit {worst_diff:.1e}")
    cols = (("forward", 10), ("prefill", 10), ("step", 8), ("head", 8), ("step/nocopy", 11), ("head/nocopy", 11))
    print(f"{'batch':>5s} " + " ".join(f"{k + ' ms':>{w}s}" for k, w in cols))
    for batch in batches:
        print(f"{batch:5d} " + " ".join(f"{best[(batch, k)] * 1000:{w}.1f}" for k, w in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
