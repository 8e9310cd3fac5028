"""Before/after of each CPU kernel patch (paddlellm.cpu_kernels) on one training step, A/B in one process.

The bench model shape of train_throughput.py (hidden 512, 4 layers, 8 heads, intermediate 1376 where the family
has that setting, vocab 8000 unless --vocab_size), built for --family (default llama) with random weights,
examples with its long-tailed lengths (median 70, 12..500, prompt 20-80%). Two batches:
unpacked (8 examples padded to the longest) and packed (3 rows of 512, block-diagonal masks). One model
per variant, all with the same weights: paddlellm's model without patches (the family's load-time fixes
included), each patch alone, and all patches. A round
times one forward+backward (SFT: every weight trained; LoRA rank 8: only adapters) of every variant in
turn; the figures (wall time and process CPU time of the step) are the best of the rounds. Interleaving in one process makes the comparison fair on a
machine shared with other jobs, where absolute times drift (the load average is recorded).

    python bench/cpu_kernels_ab.py                 # 6 rounds; ~4-6 min on an idle 2-core machine
    python bench/cpu_kernels_ab.py --rounds 3 --methods sft
    python bench/cpu_kernels_ab.py --family bloom --vocab_size 49152 --rounds 3 --methods sft
    python bench/cpu_kernels_ab.py --threads 1      # on a loaded machine: compare the CPU-time columns
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchlib import SHAPES, machine_info, save_report  # noqa: E402
from train_throughput import LENGTHS, MAX_LEN  # noqa: E402

# train_throughput.py's former MODEL: its "small" shape (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000)
MODEL = {k: SHAPES["small"][s] for k, s in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"),
                                            ("num_attention_heads", "heads"), ("intermediate_size", "intermediate"),
                                            ("vocab_size", "vocab"))}


def examples(n, seed, family=None):
    """n Examples with the benchmark's length distribution (prompt tokens unsupervised), laid out by
    family.make_example (2-D positions and the bidirectional prompt of ChatGLM v1 / GLM) when given."""
    from paddlellm.families import IGNORE, Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        while True:
            k = round(math.exp(rng.gauss(math.log(LENGTHS["median"]), LENGTHS["sigma"])))
            if k >= LENGTHS["lo"]:
                break
        k = min(k, LENGTHS["hi"])
        ids = [rng.randrange(3, 1600) for _ in range(k)]
        src = max(1, min(round(k * rng.uniform(0.2, 0.8)), k - 2))
        labels = [IGNORE] * src + ids[src + 1:] + [2]
        if family is None:
            out.append(Example(ids, labels, list(range(k))))
        else:  # the prompt is a bidirectional prefix only in prefix-LM families (ChatGLM v1, GLM)
            out.append(family.make_example(ids, labels, src if family.prefix_lm else 0, False))
    return out


def bench_config(family, vocab_size):
    """The family's config of the bench shape: MODEL's hidden size, layers, heads and vocabulary under the family's own
    keys, its intermediate size where the family has one (Bloom and GLM fix it at 4 x hidden), no dropout."""
    cfg = dict(family.tiny_config)
    shape = {k: MODEL[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    cfg.update({family.config_keys.get(k, k): v for k, v in shape.items()})
    for key in ("intermediate_size", "inner_hidden_size", "ffn_hidden_size"):
        if key in cfg:
            cfg[key] = MODEL["intermediate_size"]
    if "word_embed_proj_dim" in cfg:  # OPT: embeddings as wide as the layers (OPT-125m's layout)
        cfg["word_embed_proj_dim"] = MODEL["hidden_size"]
    if "num_key_value_heads" in cfg:
        cfg["num_key_value_heads"] = MODEL["num_attention_heads"]
    cfg.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return family.paddlenlp_class("config_class")(**cfg)


def batches(family):
    from paddlellm.data import pack_examples

    exs = examples(400, 1234, family)
    rows, _ = pack_examples(exs, MAX_LEN)
    out = {}
    for name, chosen, seq_len in (("unpacked", [[e] for e in exs[:8]], None), ("packed", rows[:3], MAX_LEN)):
        out[name] = (family.build_batch(chosen, 0, seq_len), sum(len(e) for row in chosen for e in row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--methods", default="sft,lora")
    ap.add_argument("--family", default="llama", help="a family with CPU patches (paddlellm.families)")
    ap.add_argument("--vocab_size", type=int, default=MODEL["vocab_size"],
                    help="vocabulary size (the output head and the loss grow with it; 49152 is a real small checkpoint's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads (default: paddlellm's CPU runtime choice). With 1 thread the process CPU "
                         "time of a step is close to its work, which holds up on a loaded machine better than wall time")
    ap.add_argument("--out", default=None, help="default bench/results/cpu_kernels_ab.json for LLaMA at vocab 8000, "
                    "else cpu_kernels_ab_<family>_<vocab>.json")
    args = ap.parse_args()
    if args.out is None:
        own = args.family == "llama" and args.vocab_size == MODEL["vocab_size"]
        args.out = str(REPO / "bench" / "results" / ("cpu_kernels_ab.json" if own else
                                                       f"cpu_kernels_ab_{args.family}_{args.vocab_size}.json"))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    from paddlellm.runtime import setup_runtime

    setup_runtime(quiet=True)
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    from paddlellm import cpu_kernels
    from paddlellm.families import get_family
    from paddlellm.tuning import all_linear_targets

    fam = get_family(args.family)
    # the patches a training step runs (last_logits and chatglm_generation_inputs act in generation only)
    trained = [p for p in fam.cpu_patches if not p.endswith("_last_logits") and p != "chatglm_generation_inputs"]
    variants = {"paddlenlp": ()} | ({f"+{p}": (p,) for p in trained} if len(trained) > 1 else {}) | {"all patches": tuple(trained)}
    cfg = bench_config(fam, args.vocab_size)
    model_class = fam.paddlenlp_class("model_class")
    paddle.seed(0)
    first = model_class(cfg)
    fam.init_new_weights(first)
    state = {k: v.numpy() for k, v in first.state_dict().items()}
    targets = fam.lora_target_modules or all_linear_targets(first)
    del first
    built = batches(fam)
    data = {k: {n: paddle.to_tensor(v) for n, v in b.items()} for k, (b, _) in built.items()}
    stats = {k: {"rows": int(b["input_ids"].shape[0]), "slots": int(b["input_ids"].size), "real_tokens": real,
                 "supervised": int((b["labels"] != -100).sum())} for k, (b, real) in built.items()}
    load = [os.getloadavg()]
    report = {"command": "python bench/cpu_kernels_ab.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "threads": os.environ.get("OMP_NUM_THREADS"), "family": fam.name,
              "model": dict(MODEL, vocab_size=args.vocab_size), "batches": stats, "rounds": args.rounds, "results": {}}
    for method in args.methods.split(","):
        models = {}
        for name, patches in variants.items():
            m = model_class(cfg)
            m.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
            m = fam.adapt_model(m)  # the family's load-time fixes, as load_model applies them
            cpu_kernels.apply(dataclasses.replace(fam, cpu_patches=patches), m, force=True)
            if method == "lora":
                m = LoRAModel(m, LoRAConfig(target_modules=targets, r=8, lora_alpha=16, merge_weights=False))
                m.mark_only_lora_as_trainable()
            m.train()
            models[name] = m

        def step(m, batch):
            out = m(**batch)
            (out.loss if hasattr(out, "loss") else out[0]).backward()
            m.clear_gradients()

        for batch_name, batch in data.items():
            wall = {n: float("inf") for n in models}
            cpu = {n: float("inf") for n in models}
            for m in models.values():  # warm-up
                step(m, batch)
            for _ in range(args.rounds):
                for n, m in models.items():
                    t, c = time.perf_counter(), time.process_time()
                    step(m, batch)
                    wall[n] = min(wall[n], time.perf_counter() - t)
                    cpu[n] = min(cpu[n], time.process_time() - c)
            load.append(os.getloadavg())
            rows = {n: {"wall_s": round(wall[n], 4), "cpu_s": round(cpu[n], 4),
                        "speedup_wall": round(wall["paddlenlp"] / wall[n], 3), "speedup_cpu": round(cpu["paddlenlp"] / cpu[n], 3),
                        "real_tokens_per_s": round(stats[batch_name]["real_tokens"] / wall[n], 1)} for n in models}
            report["results"][f"{method}_{batch_name}"] = rows
            print(f"{method} {batch_name} ({stats[batch_name]['slots']} slots, {stats[batch_name]['real_tokens']} real, "
                  f"{stats[batch_name]['supervised']} supervised tokens), forward+backward, best of {args.rounds}:", flush=True)
            for n, r in rows.items():
                print(f"  {n:28s} wall {r['wall_s']:7.3f} s {r['speedup_wall']:5.2f}x   CPU {r['cpu_s']:7.3f} s "
                      f"{r['speedup_cpu']:5.2f}x   {r['real_tokens_per_s']:7.1f} real tok/s", flush=True)
        del models
    report["load_average"] = load
    print(f"load average (1/5/15 min) during the run: {load}")
    print(f"saved {save_report(args.out, report)}")


if __name__ == "__main__":
    main()
