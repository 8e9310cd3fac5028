"""Quickstart: build a tiny LLaMA, LoRA-tune it on the bundled data, and show that it learned.

The bundled task (data/train.json, data/dev.json) spells digits as words ("spell: 4 0 7" ->
"four zero seven"); dev prompts never appear in train. Dev accuracy is the exact match of
greedy generations, before and after fine-tuning.

The figure is seeded and repeats run after run on one machine, but not across CPUs: MKL picks its
matmul kernels by CPU (AVX2 on AMD under paddlellm's tuning, its own choice on Intel), the last bits
of each product differ with the kernels, and 12 epochs of training carry that into a reply of the 40
(90.0% to 92.5% on the machines measured, see the README). So the quickstart says which CPU and MKL setting it measured on, and saves them with
the figures.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class QuickstartArgument:
    output: str = field(default="quickstart_output", metadata={"help": "Folder for the tiny model and the LoRA output."})
    epochs: int = field(default=12, metadata={"help": "Training epochs over data/train.json."})
    learning_rate: float = field(default=5e-3, metadata={"help": "LoRA learning rate."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})


def exact_match(output_dir_or_model: str, lora_path=None) -> tuple:
    from .data import read_split
    from .generation import generate_replies
    from .loading import load_for_inference

    model, tokenizer, family, _ = load_for_inference(output_dir_or_model, lora_path=lora_path)
    records = read_split(os.path.join(ROOT, "data"), "dev")
    outputs = generate_replies(model, tokenizer, family, records, src_length=16, max_new_tokens=12, batch_size=40)
    hits = sum(o == r.tgt[-1] for o, r in zip(outputs, records))
    return 100.0 * hits / len(records), list(zip(records, outputs))


def machine() -> dict:
    """Where the figures were measured: CPU model, threads, and what decides MKL's code path."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                    break
    except OSError:
        pass
    mkl = [f"{k}={os.environ[k]}" for k in ("MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(k)]
    return {"cpu": cpu or "unknown CPU", "threads": os.environ.get("OMP_NUM_THREADS", "?"),
            "mkl_path": " ".join(mkl) or "MKL's own choice"}


def main(argv=None) -> int:
    from .arguments import parse_args
    from .runtime import setup_runtime

    (args,) = parse_args([QuickstartArgument], argv, prog="paddlellm quickstart", description=__doc__.splitlines()[0])
    setup_runtime(quiet=True)
    from .commands import finetune
    from .commands.tiny import build_tiny

    start = time.time()
    base = os.path.join(args.output, "tiny-llama")
    lora_out = os.path.join(args.output, "lora")
    print(f"[1/4] building a tiny random LLaMA (hidden 128, 2 layers) with its tokenizer in {base}")
    build_tiny("llama", base, hidden_size=128, num_hidden_layers=2, seed=42)
    before, _ = exact_match(base)
    print(f"[2/4] dev exact match before fine-tuning: {before:.1f}%")
    print(f"[3/4] LoRA fine-tuning on data/train.json ({args.epochs} epochs)")
    finetune.run([
        "--model_name_or_path", base, "--dataset_name_or_path", os.path.join(ROOT, "data"), "--output_dir", lora_out,
        "--lora", "true", "--lora_rank", "16", "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", "16",
        "--learning_rate", str(args.learning_rate), "--warmup_steps", "10", "--src_length", "16", "--tgt_length", "12",
        "--logging_steps", "20", "--evaluation_strategy", "no", "--save_strategy", "no", "--overwrite_output_dir", "true",
        "--disable_tqdm", str(args.disable_tqdm).lower(), "--seed", "42",
    ])
    after, samples = exact_match(lora_out)
    where = machine()
    print(f"[4/4] dev exact match after fine-tuning: {after:.1f}%  (before: {before:.1f}%; "
          f"on {where['cpu']}, {where['threads']} threads, MKL path: {where['mkl_path']})")
    for rec, out in samples[:5]:
        print(f"    {rec.src[-1]!r:24} -> {out!r}  (expected {rec.tgt[-1]!r})")
    with open(os.path.join(args.output, "quickstart_results.json"), "w", encoding="utf-8") as f:
        json.dump({"dev_exact_match_before": before, "dev_exact_match_after": after, "seconds": round(time.time() - start, 1),
                   "machine": where}, f, indent=2)
    print(f"done in {time.time() - start:.0f}s; LoRA adapters in {lora_out}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
