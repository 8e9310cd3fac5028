"""Benchmark paddlellm's CPU runtime tuning (threads + MKL code path) against paddle's defaults.

Each measurement runs in a fresh subprocess, because OpenMP/MKL read their settings once,
when paddle loads. Three set-ups, all starting from an environment with no OMP/MKL variables:
  default      -- PADDLELLM_CPU_TUNING=0: what paddle does on its own (one thread);
  threads only -- the thread count tuning would choose, MKL left on its default code path;
  tuned        -- paddlellm.cpu_runtime.configure() decides everything.

    python bench/cpu_runtime.py [--quick] [--out bench/results/cpu_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import machine_info, matmul_gflops, save_report  # noqa: E402
from paddlellm import cpu_runtime  # noqa: E402  (stdlib only, safe before paddle)

TUNED_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", cpu_runtime.DISABLE_VAR)
MODES = ("default", "threads only", "tuned")
MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, max_position_embeddings=512)
TRAIN_BATCH, TRAIN_SEQ = 4, 256
GEN_BATCH, GEN_PROMPT, GEN_NEW = 4, 64, 32


# ---- workers: run in a child process, print one "RESULT {json}" line ----------------------

def _model():
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL))


def _train(warmup: int, steps: int) -> dict:
    import paddle

    model = _model()
    model.train()
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    ids = paddle.randint(0, MODEL["vocab_size"], [TRAIN_BATCH, TRAIN_SEQ])

    def step():
        out = model(input_ids=ids, labels=ids)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        opt.step()
        opt.clear_grad()
        return float(loss)  # float() syncs, so the timing covers the whole step

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    # Best step, not the mean: other jobs on a shared machine only ever slow a step down.
    return {"tokens_per_s": TRAIN_BATCH * TRAIN_SEQ / min(times), "step_s": times}


def _generate(warmup: int, reps: int) -> dict:
    import paddle

    model = _model()
    model.eval()
    ids = paddle.randint(0, MODEL["vocab_size"], [GEN_BATCH, GEN_PROMPT])
    mask = paddle.ones_like(ids)  # paddlenlp 3.0.0b4's cache path fails without a mask

    def run():
        with paddle.no_grad():
            out, _ = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_NEW,
                                    decode_strategy="greedy_search")
        return int(out.shape[0] * out.shape[1])

    for _ in range(warmup):
        run()
    times, tokens = [], 0
    for _ in range(reps):
        t = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": tokens / min(times), "generated_tokens": tokens, "run_s": times}


def worker(kind: str, quick: bool) -> None:
    cpu_runtime.configure()  # no-op in the "default" and "threads only" set-ups
    if kind == "matmul":
        res = {"gflops": matmul_gflops(reps=5 if quick else 20)}
    elif kind == "train":
        res = _train(warmup=1, steps=2) if quick else _train(warmup=1, steps=3)
    else:
        res = _generate(warmup=1, reps=2) if quick else _generate(warmup=1, reps=3)
    res["env"] = {v: os.environ.get(v) for v in TUNED_VARS[:3]}
    print("RESULT " + json.dumps(res), flush=True)


# ---- driver ------------------------------------------------------------------------------

def mode_env(mode: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if mode != "tuned":
        env[cpu_runtime.DISABLE_VAR] = "0"
    if mode == "threads only":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(kind: str, mode: str, threads: int, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=mode_env(mode, threads), cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind}/{mode} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    log = [l for l in proc.stderr.splitlines() if l.startswith("paddlellm: CPU runtime:")]
    res["log"] = log[0] if log else None
    return res


BENCHES = [
    ("matmul", "matmul 1024x1024 fp32", "gflops", "GFLOP/s"),
    ("train", f"train LLaMA-20M, {TRAIN_BATCH}x{TRAIN_SEQ} tokens, AdamW", "tokens_per_s", "tokens/s"),
    ("generate", f"generate {GEN_BATCH}x{GEN_PROMPT} prompt +{GEN_NEW} greedy", "tokens_per_s",
     "tokens/s"),
]


def table(results: dict) -> str:
    head = "| benchmark | unit | " + " | ".join(MODES) + " | tuned / default |"
    rows = [head, "|" + "---|" * (len(MODES) + 3)]
    for kind, label, key, unit in BENCHES:
        vals = [results[kind][m][key] for m in MODES]
        cells = " | ".join(f"{v:.1f}" for v in vals)
        rows.append(f"| {label} | {unit} | {cells} | {vals[-1] / vals[0]:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and training steps")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_runtime.json"))
    ap.add_argument("--worker", choices=[b[0] for b in BENCHES], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.quick)
        return

    clean = {k: v for k, v in os.environ.items() if k not in TUNED_VARS}
    decision = cpu_runtime.decide(clean, Path("/proc/cpuinfo").read_text(), cpu_runtime.usable_cpu_count())
    threads = int(decision.env.get("OMP_NUM_THREADS", "1"))
    print(f"tuning on this machine: {decision.reason}", flush=True)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other jobs are running, figures "
              "will be low and noisy (all-thread runs suffer most)", flush=True)

    start = time.perf_counter()
    load_before = os.getloadavg()
    rounds = 1 if args.quick else 2
    results: dict = {kind: {m: {"runs": []} for m in MODES} for kind, *_ in BENCHES}
    # Modes are interleaved and repeated so a burst of outside load hits them all alike;
    # each mode keeps its best round.
    for rnd in range(rounds):
        for kind, label, key, unit in BENCHES:
            for mode in MODES:
                r = run_child(kind, mode, threads, args.quick)
                slot = results[kind][mode]
                slot["runs"].append(r)
                slot[key] = max(slot.get(key, 0.0), r[key])
                print(f"  round {rnd + 1}  {label:45s} {mode:13s} {r[key]:9.1f} {unit}", flush=True)

    report = {
        "machine": machine_info(),
        "tuning": {"env": decision.env, "reason": decision.reason},
        "quick": args.quick,
        "command": "python bench/cpu_runtime.py" + (" --quick" if args.quick else ""),
        "model": {**MODEL, "train_batch": TRAIN_BATCH, "train_seq": TRAIN_SEQ,
                  "gen_batch": GEN_BATCH, "gen_prompt": GEN_PROMPT, "gen_new_tokens": GEN_NEW},
        "method": "matmul: best of repeated calls; train: best step after warm-up; generate: "
                  f"best call after warm-up; each mode in a fresh process, best of {rounds} "
                  "interleaved round(s)",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out = save_report(args.out, report)
    print()
    print(table(results))
    print(f"\nsaved {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
