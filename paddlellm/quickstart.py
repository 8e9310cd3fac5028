"""Quickstart: build a tiny LLaMA, LoRA-tune it on the bundled data, and show that it learned.

The bundled task (data/train.json, data/dev.json) spells digits as words ("spell: 4 0 7" ->
"four zero seven"); dev prompts never appear in train. Dev accuracy is the exact match of
greedy generations, before and after fine-tuning.
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
    from .loading import generate_replies, load_for_inference

    model, tokenizer, family, _ = load_for_inference(output_dir_or_model, lora_path=lora_path)
    records = read_split(os.path.join(ROOT, "data"), "dev")
    outputs = generate_replies(model, tokenizer, family, records, src_length=16, max_new_tokens=12, batch_size=40)
    hits = sum(o == r.tgt[-1] for o, r in zip(outputs, records))
    return 100.0 * hits / len(records), list(zip(records, outputs))


def main(argv=None) -> int:
    from .arguments import parse_args
    from .runtime import setup_runtime

    (args,) = parse_args([QuickstartArgument], argv, prog="paddlellm quickstart", description=__doc__.splitlines()[0])
    setup_runtime(quiet=True)
    from . import finetune
    from .tiny import build_tiny

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
    print(f"[4/4] dev exact match after fine-tuning: {after:.1f}%  (before: {before:.1f}%)")
    for rec, out in samples[:5]:
        print(f"    {rec.src[-1]!r:24} -> {out!r}  (expected {rec.tgt[-1]!r})")
    with open(os.path.join(args.output, "quickstart_results.json"), "w", encoding="utf-8") as f:
        json.dump({"dev_exact_match_before": before, "dev_exact_match_after": after, "seconds": round(time.time() - start, 1)}, f, indent=2)
    print(f"done in {time.time() - start:.0f}s; LoRA adapters in {lora_out}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
