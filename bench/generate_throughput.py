"""Batch-prediction throughput: generated tokens/s, length-bucketed batches against in-order batches.

A random model of --family (default llama) at --shape (small, the default: hidden 512, 4 layers, 8 heads,
vocab 8000; real: hidden 576, 30 layers, 9 heads / 3 key-value heads, intermediate 1536, vocab 49152, tied
embeddings -- see benchlib.SHAPES), built by `paddlellm tiny`'s builder with the family's own tokenizer and
loaded as predict loads it, generates greedy replies for prompts (the family's prompt format around n
single-piece words) whose lengths follow a long-tailed (log-normal) spread, as real instruction data does:
most prompts are short, a few are long. Each setting runs the code path of predict_generation.py
(`paddlellm.commands.predict.plan_batches` + `paddlellm.generation.generate_ids`: left padding, attention mask,
KV cache) at batch 1, 8 and 32, with batches formed
  in order -- consecutive prompts, as PaddleNLP's predict_generation.py batches them;
  bucketed -- prompts of similar length together (what predict_generation.py does).
Greedy decoding makes both produce the same replies, so tokens/s compares like with like.

Arms (--arms): each setting runs once per arm per round, arms interleaved, best of --rounds kept, so a
load change on the shared machine hits every arm alike (the load average is recorded):
  generate -- paddlenlp's generate() (the code path before the decode loop; glibc's default malloc thresholds)
  loop     -- paddlellm.decode_loop (what predict and serve run now)
  static   -- the same model exported with export_model.py's code (one step program run by paddle.inference),
              loaded with load_static and driven as predict drives it (generate_ids choosing its path: the
              decode loop, since the 0-layer host is a plain paddlenlp model class); export + load untimed
With the static arm, each mode's peak memory (VmHWM: load + the batch-8 bucketed run) is measured in a fresh
process per mode, dynamic vs static, since a process's peak can only grow.
With --peer_python (a Python with torch + transformers, e.g. /work/venv-gen/bin/python), the same weights,
prompts and batches also run through transformers' generate() (bench/peer_transformers.py, a subprocess
per setting, right after our arms) and each row gets its ratio to it; the model goes to transformers through
`paddlellm export-hf` (families transformers has: llama, bloom, opt, gpt as GPT-2, qwen2; the others print
"no peer"). Replies are compared with the peer's (greedy: the same tokens are expected).

    python bench/generate_throughput.py [--family llama] [--shape small|real] [--arms generate,loop,static] [--prompts 64]
        [--new_tokens 32] [--rounds 2] [--threads N] [--peer_python PY] [--out ...]

Output: bench/results/generate_throughput.json with neither --family nor --shape, else
bench/results/generate_throughput_<family>_<shape>.json.
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

import benchlib  # noqa: E402  (bench/ is on sys.path when this file runs)

BATCHES = (1, 8, 32)


def prompt_lengths(n: int, longest: int, seed: int = 0):
    """Long-tailed prompt lengths: log-normal with median ~48 tokens, clipped to [4, longest]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(mean=np.log(48), sigma=0.9, size=n), 4, longest).round()]


def build(tmp: str, family_name: str, shape: str):
    """A model folder tmp/model (random weights, the family's tokenizer at the shape's vocabulary), loaded as
    predict loads it (load_for_inference: the family's CPU kernels and decode runner where it has them)."""
    from paddlellm.loading import load_for_inference

    folder = benchlib.build_model(family_name, shape, os.path.join(tmp, "model"))
    model, tokenizer, family, _ = load_for_inference(folder)
    return model, tokenizer, family


def make_prompts(family, tokenizer, lengths, seed: int = 1):
    """The family's generation prompt (predict's: its special tokens and format) around n random single-piece
    words for every n in lengths."""
    import numpy as np

    words = benchlib.bench_words(tokenizer)
    rng = np.random.default_rng(seed)
    return [family.generation_prompt(tokenizer, [" ".join(rng.choice(words, size=max(1, n - 2)))], [], 100000) for n in lengths]


def arm_generate(model, tokenizer, family, prompts, new_tokens):
    """paddlenlp generate(), with glibc's default malloc thresholds (as before the decode loop existed)."""
    from paddlellm.decode_loop import set_malloc_thresholds
    from paddlellm.generation import generate_ids

    set_malloc_thresholds(128 * 1024)
    return generate_ids(model, tokenizer, family, prompts, new_tokens, own_loop=False)


def arm_loop(model, tokenizer, family, prompts, new_tokens):
    """paddlellm.decode_loop with the freed KV-cache blocks kept (what predict runs)."""
    from paddlellm.decode_loop import set_malloc_thresholds
    from paddlellm.generation import generate_ids

    set_malloc_thresholds(1 << 30)
    return generate_ids(model, tokenizer, family, prompts, new_tokens, own_loop=True)


STATIC = {}  # "model": the static host, set by main before the static arm runs


def arm_static(model, tokenizer, family, prompts, new_tokens):
    """export_model.py's static export of the same model (load_static), through generate_ids as predict calls it."""
    from paddlellm.decode_loop import set_malloc_thresholds
    from paddlellm.generation import generate_ids

    set_malloc_thresholds(1 << 30)  # what the decode loop sets in predict (keep_freed_memory)
    return generate_ids(STATIC["model"], tokenizer, family, prompts, new_tokens)  # own_loop chosen as in predict


# name -> function(model, tokenizer, family, prompts of one batch, new_tokens) -> reply ids; other arms add entries.
ARMS = {"generate": arm_generate, "loop": arm_loop, "static": arm_static}


def export_static(model, tokenizer, tmp: str) -> str:
    """Save the model as a model folder, export it with export_model.py's code; returns the export folder."""
    import subprocess

    folder, out = os.path.join(tmp, "model"), os.path.join(tmp, "static")  # the model folder build() wrote
    # In a child process, as a user runs it: in this process, the export (dy2static tracing and saving) left the
    # dynamic arms ~1.5x slower afterwards (measured: a batch-8 decode 0.27 s before, 0.43 s after), which would
    # have been charged to the dynamic loop, not to anything predict does.
    subprocess.run([sys.executable, str(REPO / "export_model.py"), "--model_name_or_path", folder, "--output_path", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def peak_rss_child(path: str, prompts_file: str, new_tokens: int) -> None:
    """(Run in a fresh process.) Load `path` as predict does, generate the batch-8 bucketed plan, print VmHWM in MB."""
    import json

    from paddlellm.loading import load_for_inference
    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    with open(prompts_file) as f:
        prompts = json.load(f)
    model, tokenizer, family, _ = load_for_inference(path)
    STATIC["model"] = model
    run_plan(model, tokenizer, family, prompts, 8, True, new_tokens, arm_static)  # predict's path for either mode
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a forked child's ru_maxrss.
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"PEAK_RSS_MB {hwm_kb / 1024:.1f}")


def peak_rss(path: str, prompts, new_tokens: int, tmp: str) -> float:
    """Peak RSS (MB) of a fresh process loading `path` and running the batch-8 plan (peak_rss_child)."""
    import json
    import subprocess

    prompts_file = os.path.join(tmp, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump(prompts, f)
    out = subprocess.run([sys.executable, __file__, "--peak_rss_of", path, "--prompts_file", prompts_file, "--new_tokens", str(new_tokens)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("PEAK_RSS_MB")[-1].split()[0])


def run_plan(model, tokenizer, family, prompts, batch_size, bucket, new_tokens, arm=arm_loop):
    from paddlellm.commands.predict import plan_batches

    lengths = [len(p) for p in prompts]
    plan = plan_batches(lengths, batch_size, bucket=bucket)
    padded = sum(max(lengths[i] for i in idx) * len(idx) for idx in plan)
    replies = [None] * len(prompts)
    start, cpu = time.perf_counter(), time.process_time()
    for idx in plan:
        for i, ids in zip(idx, arm(model, tokenizer, family, [prompts[i] for i in idx], new_tokens)):
            replies[i] = ids
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(r) for r in replies)
    return {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
            # per second of this process's CPU time: with --threads 1 close to the work itself, far less disturbed by
            # other processes than wall time
            "tokens_per_cpu_second": round(tokens / max(cpu, 1e-9), 1),
            "prompt_tokens": sum(lengths), "padded_prompt_tokens": padded,
            "padding_fraction": round(1 - sum(lengths) / padded, 3)}, replies


def peer_round(python: str, family, tokenizer, prompts, plans, new_tokens, tmp: str):
    """One run of bench/peer_transformers.py on the same weights (`paddlellm export-hf` of the model folder), the
    same batches and the very inputs (ids, attention mask) our arms feed, greedy (a subprocess)."""
    import json
    import subprocess

    from paddlellm.generation import _generation_inputs

    hf_dir = os.path.join(tmp, "hf")
    if not os.path.exists(hf_dir):
        benchlib.export_hf(os.path.join(tmp, "model"), hf_dir)
    batches = {}
    for name, plan in plans.items():
        batches[name] = []
        for idx in plan:
            inputs = _generation_inputs(family, tokenizer, [prompts[i] for i in idx], new_tokens)
            batches[name].append({"rows": list(idx), "input_ids": [list(map(int, r)) for r in inputs["input_ids"]],
                                  "attention_mask": [list(map(int, r)) for r in inputs["attention_mask"]]})
    stops = family.stop_token_ids(tokenizer)
    job = {"hf_dir": hf_dir, "batches": batches, "prompts": len(prompts), "pad_id": tokenizer.pad_token_id,
           "eos_ids": list(stops), "new_tokens": new_tokens, "threads": int(os.environ.get("OMP_NUM_THREADS") or 1)}
    job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "peer.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    proc = subprocess.run([python, str(REPO / "bench" / "peer_transformers.py"), job_path, out_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peer arm failed ({python}):\n{proc.stderr[-3000:]}")
    with open(out_path) as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=benchlib.FAMILIES, default=None, help="model family (default llama)")
    parser.add_argument("--shape", choices=sorted(benchlib.SHAPES), default=None, help="model shape (default small)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--orders", default="in order,bucketed", help="batching orders for batch > 1: 'in order', 'bucketed'")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {sorted(ARMS)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best of them is kept")
    parser.add_argument("--threads", type=int, default=None,
                        help="math threads of our arms and of the peer (default: paddlellm's CPU runtime choice). On a machine "
                             "shared with other jobs use 1: torch's spinning OpenMP threads lose several times their speed "
                             "when the cores are oversubscribed, which would be charged to the peer")
    parser.add_argument("--peer_python", default=None, help="a Python with torch + transformers: adds their generate() as a peer")
    parser.add_argument("--out", default=None, help="default: bench/results/generate_throughput[_<family>_<shape>].json")
    parser.add_argument("--peak_rss_of", help=argparse.SUPPRESS)  # internal: the per-mode memory child
    parser.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_of:
        peak_rss_child(args.peak_rss_of, args.prompts_file, args.new_tokens)
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}")
    if args.threads:  # before paddle loads; paddlellm's CPU runtime keeps thread counts the user set
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    args.out = args.out or str(benchlib.default_out("generate_throughput", args.family, args.shape))
    family_name, shape = args.family or "llama", args.shape or "small"
    peer_python = args.peer_python
    if peer_python and not benchlib.has_peer(family_name):
        print(f"{family_name}: no peer (transformers has no such architecture); compare its time per token with "
              f"llama's at --shape {shape}", flush=True)
        peer_python = None

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import numpy as np

    from paddlellm.commands.predict import plan_batches

    tmp_ctx = tempfile.TemporaryDirectory()
    tmp = tmp_ctx.name
    model, tokenizer, family = build(tmp, family_name, shape)
    # room for the family's prompt format and the reply within the shape's positions (GLM lays out both)
    longest = min(benchlib.SHAPES[shape]["max_positions"], 512) - args.new_tokens - 16
    prompts = make_prompts(family, tokenizer, prompt_lengths(args.prompts, longest))
    prompts = [p[-longest:] if len(p) > longest else p for p in prompts]
    lengths = [len(p) for p in prompts]
    print(f"{family_name} at --shape {shape}: {sum(lengths)} prompt tokens in {len(prompts)} prompts (median "
          f"{int(np.median(lengths))}, max {max(lengths)}), {args.new_tokens} new tokens each", flush=True)
    if "static" in arms:
        from paddlellm.generation import uses_own_loop
        from paddlellm.formats.static import load_static

        static_dir = export_static(model, tokenizer, tmp)
        STATIC["model"] = load_static(static_dir, family)[0]
        static_path = "decode loop" if uses_own_loop(STATIC["model"], family, sampling=False) else "paddlenlp generate()"
        print(f"static arm: generate_ids drives the static host with the {static_path}", flush=True)
    for arm in arms:
        run_plan(model, tokenizer, family, prompts[:4], 4, True, 4, ARMS[arm])  # warm-up

    settings = []  # (batch, batching label, bucket)
    for batch in [int(b) for b in args.batches.split(",")]:
        if batch == 1:
            settings.append((1, "any (batch 1)", False))
        else:
            settings += [(batch, o.strip(), o.strip() == "bucketed") for o in args.orders.split(",") if o.strip()]
    plans = {f"{b}/{label}": plan_batches(lengths, b, bucket=bucket) for b, label, bucket in settings}

    loads = [round(os.getloadavg()[0], 2)]  # other work on the machine skews timings: recorded with the figures
    best, replies, peer = {}, {}, None
    for r in range(args.rounds):
        for b, label, bucket in settings:
            for arm in arms:  # interleaved: every arm sees the same load, round after round
                row, replies[(arm, b, label)] = run_plan(model, tokenizer, family, prompts, b, bucket, args.new_tokens, ARMS[arm])
                key = (arm, b, label)
                if key not in best or row["tokens_per_second"] > best[key]["tokens_per_second"]:
                    best[key] = dict(row, arm=arm, batch_size=b, batching=label)
                print(f"round {r + 1}  {arm:<9} batch {b:>2}  {label:<14} {row['tokens_per_second']:>7.1f} tokens/s "
                      f"({row['generated_tokens']} tokens in {row['seconds']:.1f} s, padding {100 * row['padding_fraction']:.0f}%)", flush=True)
            if peer_python:  # right after our arms on the same setting, so it sees about the same load
                name = f"{b}/{label}"
                got = peer_round(peer_python, family, tokenizer, prompts, {name: plans[name]}, args.new_tokens, tmp)
                row = got["plans"][name]
                print(f"round {r + 1}  {'peer':<9} batch {b:>2}  {label:<14} {row['tokens_per_second']:>7.1f} tokens/s", flush=True)
                if peer is None:
                    peer = {"versions": got["versions"], "threads": got["threads"], "plans": {}, "replies": {}}
                if name not in peer["plans"] or row["tokens_per_second"] > peer["plans"][name]["tokens_per_second"]:
                    peer["plans"][name], peer["replies"][name] = row, got["replies"][name]
        loads.append(round(os.getloadavg()[0], 2))
    memory = None
    if "static" in arms:
        memory = {"dynamic": peak_rss(os.path.join(tmp, "model"), prompts, args.new_tokens, tmp),
                  "static": peak_rss(static_dir, prompts, args.new_tokens, tmp)}
        print(f"peak RSS (fresh process, load + batch-8 bucketed run): dynamic {memory['dynamic']:.0f} MB, static {memory['static']:.0f} MB")
    tmp_ctx.cleanup()

    results = []
    for (arm, b, label), row in best.items():
        name = f"{b}/{label}"
        # time per generated token: what families without a transformers peer are compared by (with llama's)
        row["ms_per_token"] = round(1000 * row["seconds"] / max(row["generated_tokens"], 1), 2)
        if "generate" in arms and arm != "generate":
            row["speedup_vs_generate"] = round(row["tokens_per_second"] / best[("generate", b, label)]["tokens_per_second"], 2)
        if arm == "static" and "loop" in arms:  # static vs the dynamic decode loop predict runs on a model folder
            row["speedup_vs_loop"] = round(row["tokens_per_second"] / best[("loop", b, label)]["tokens_per_second"], 2)
            row["same_replies_as_loop"] = sum(x == y for x, y in zip(replies[(arm, b, label)], replies[("loop", b, label)]))
        if peer is not None:
            p = peer["plans"][name]
            row["ratio_to_transformers"] = round(row["tokens_per_second"] / p["tokens_per_second"], 2)
            if "tokens_per_cpu_second" in p:
                row["ratio_to_transformers_cpu_time"] = round(row["tokens_per_cpu_second"] / p["tokens_per_cpu_second"], 2)
            ours, theirs = replies[(arm, b, label)], peer["replies"][name]
            row["same_replies_as_transformers"] = sum(x == y for x, y in zip(ours, theirs))
            row["same_first_token_as_transformers"] = sum(x[:1] == y[:1] for x, y in zip(ours, theirs))
            # share of generated tokens equal to the peer's up to the first difference (greedy: 1.0 when all agree)
            agree = sum(next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))) for x, y in zip(ours, theirs))
            row["agreeing_token_share"] = round(agree / max(sum(len(y) for y in theirs), 1), 4)
            print(f"{arm:<9} batch {b:>2} {label:<14} paddlellm / transformers {row['ratio_to_transformers']:.2f}x "
                  f"(per CPU-second {row.get('ratio_to_transformers_cpu_time', float('nan')):.2f}x); greedy replies "
                  f"equal to the peer's: {row['same_replies_as_transformers']}/{len(ours)} (first token "
                  f"{row['same_first_token_as_transformers']}/{len(ours)}, tokens before a difference {100 * row['agreeing_token_share']:.1f}%)")
        results.append(row)
    for b, label, _ in settings:
        same = {arm: replies[(arm, b, label)] for arm in arms}
        ref = same[arms[0]]
        print(f"batch {b:>2} {label:<14} same replies in every arm: {all(v == ref for v in same.values())}")
    out = {
        "benchmark": "generate_throughput",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average_1min_per_round": loads,
                    "note": "shared machine: other processes ran meanwhile; arms interleaved, best of rounds kept"},
        "versions": {p: importlib.metadata.version(p) for p in ("paddlepaddle", "paddlenlp")},
        "family": family_name,
        "shape": shape,
        "model": benchlib.shape_of(family_name, shape),
        "command": "python bench/generate_throughput.py " + " ".join(sys.argv[1:]),
        "prompts": {"count": len(prompts), "lengths": lengths, "median": int(np.median(lengths)), "max": max(lengths),
                    "distribution": "log-normal, median 48, sigma 0.9 (words; the family's prompt format around them)"},
        "new_tokens": args.new_tokens,
        "decoding": "greedy, KV cache, left padding + attention mask",
        "arms": {a: ARMS[a].__doc__ for a in arms},
        "rounds": args.rounds,
        "results": results,
    }
    if memory is not None:
        out["static"] = {"driven_by": static_path, "peak_rss_mb": memory,
                         "peak_rss_what": "VmHWM of a fresh process per mode: load_for_inference + the batch-8 bucketed run"}
    if peer is not None:
        out["peer"] = {"what": "transformers generate() on the export-hf folder, same weights/inputs/batches, greedy", "versions": peer["versions"],
                       "threads": peer["threads"], "results": peer["plans"]}
    benchlib.save_report(args.out, out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
