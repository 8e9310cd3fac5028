"""Decode-step time of an in-place static export (format 2) on a plain and on a oneDNN paddle.inference predictor,
against the family's dynamic decode runner, per batch size (what formats/static.py's ONEDNN_MIN_BATCH rests on).

The family's random model at the bench shape (benchlib.build_model, "small" unless --shape) is exported with
export_model.py; a batch of --prompt random token ids is prefilled and --steps greedy decode steps follow, in
three arms: the dynamic runner ("dynamic"), the static program on a plain predictor ("plain") and on a oneDNN one
("onednn"). Arms interleaved, best of --rounds; wall and process CPU time per step. Greedy tokens are compared
across arms (the script fails if they differ).

    python bench/static_predictors.py [--family llama] [--batches 1,2,4,8,32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llama")
    ap.add_argument("--shape", default="small")
    ap.add_argument("--batches", default="1,2,4,8,32")
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    import benchlib

    work = tempfile.mkdtemp(prefix="paddlellm-static-predictors-")
    folder = benchlib.build_model(args.family, args.shape, os.path.join(work, "model"))
    exported = os.path.join(work, "static")
    subprocess.run([sys.executable, str(REPO / "export_model.py"), "--model_name_or_path", folder, "--output_path", exported],
                   check=True, capture_output=True)

    import paddle

    from paddlellm.formats import static as st
    from paddlellm.loading import load_for_inference

    model, _, fam, _ = load_for_inference(folder)
    shell, _, _, _ = load_for_inference(exported)
    program = shell.forward.program
    meta = st.read_static_meta(exported)
    predictors = {"plain": program.predictor, "onednn": st.create_predictor(exported, meta, onednn=True)[0]}

    def run(make, batch, ids):
        runner = make()
        with paddle.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            logits = runner.prefill({"input_ids": ids, "attention_mask": paddle.ones(ids.shape, "int64")}, args.prompt + args.steps + 1)
            t1, c1 = time.perf_counter(), time.process_time()
            tokens = []
            for _ in range(args.steps):
                nxt = logits.argmax(-1, keepdim=True)
                tokens.append(nxt.numpy())
                logits = runner.step(nxt)
            t2, c2 = time.perf_counter(), time.process_time()
        return {"prefill_ms": (t1 - t0) * 1e3, "step_ms": (t2 - t1) / args.steps * 1e3,
                "step_cpu_ms": (c2 - c1) / args.steps * 1e3}, np.concatenate(tokens, 1)

    def static_arm(kind):
        def make():
            runner = st.InPlaceRunner(program)
            runner.prefill = _pinned(runner, predictors[kind])
            return runner
        return make

    arms = {"dynamic": lambda: fam.decode_runner(model), "plain": static_arm("plain"), "onednn": static_arm("onednn")}
    rng = np.random.default_rng(0)
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = paddle.to_tensor(rng.integers(10, 500, size=[batch, args.prompt]))
        best, seen = {}, {}
        for _ in range(args.rounds):
            for arm, make in arms.items():
                figures, tokens = run(make, batch, ids)
                seen.setdefault(arm, tokens)
                if not (seen[arm] == tokens).all() or not (seen["dynamic"] == tokens).all():
                    raise SystemExit(f"batch {batch}: {arm} gave other tokens than the dynamic runner")
                if arm not in best or figures["step_ms"] < best[arm]["step_ms"]:
                    best[arm] = figures
        results[batch] = best
        print(f"batch {batch}: " + "; ".join(f"{arm} prefill {f['prefill_ms']:.0f} ms, step {f['step_ms']:.2f} ms "
                                             f"(cpu {f['step_cpu_ms']:.2f})" for arm, f in best.items()), flush=True)
    out = args.out or REPO / "bench" / "results" / f"static_predictors_{args.family}_{args.shape}.json"
    benchlib.save_report(out, {"machine": benchlib.machine_info(), "args": vars(args), "same_tokens": True,
                               "results": {str(b): r for b, r in results.items()}})
    print(f"saved {out}")
    return 0


def _pinned(runner, predictor):
    """runner.prefill that runs every call of this runner on `predictor` (instead of predictor_for(batch))."""
    prefill = runner.prefill

    def pinned(inputs, capacity):
        runner.program.predictor_for = lambda batch: predictor
        try:
            return prefill(inputs, capacity)
        finally:
            del runner.program.predictor_for
    return pinned


if __name__ == "__main__":
    sys.exit(main())
