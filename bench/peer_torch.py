"""Peer arm of bench/train_throughput.py: the same model weights (the bench's model folder written as a
transformers folder by `paddlellm export-hf`) and the very same batches, trained with transformers (+ PEFT for
LoRA, on every linear layer but the output head, as paddlellm's LoRA) on torch. Run by train_throughput.py with
--peer_python, in a venv of its own (torch and transformers are never dependencies of paddlellm):

    python3 -m venv /work/venv-hf && /work/venv-hf/bin/pip install torch==2.13.0 && /work/venv-hf/bin/pip install transformers peft
    python bench/train_throughput.py --peer_python /work/venv-hf/bin/python

Imports only torch/transformers/peft and the standard library (no paddle, no paddlellm). Reads the batches
paddlellm's run fed to its model (token ids, labels, real length of each row) and replays them: unpacked
batches with their padding mask; packed rows as plain concatenation (one causal sequence per row, positions
0..n-1 -- what transformers does without flash attention, so packed examples see each other; paddlellm's
packing is exact). The loss is the mean cross-entropy over the supervised tokens (labels are already
shifted: labels[i] is the target of input_ids[i]), like paddlellm's.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", required=True, help="JSON written by train_throughput.py's train child")
    ap.add_argument("--hf_dir", required=True, help="the model folder as `paddlellm export-hf` wrote it")
    ap.add_argument("--kind", choices=["sft", "lora"], required=True)
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.batches) as f:
        batches = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    if a.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    steps = [time.perf_counter()]
    cpu = [time.process_time()]
    real = []
    first_loss = None
    for b in batches:
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        labels = torch.tensor(b["labels"], dtype=torch.long)
        lengths = torch.tensor(b["row_lengths"], dtype=torch.long)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if first_loss is None:
            first_loss = float(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # paddlellm's default max_grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter())
        cpu.append(time.process_time())
        real.append(int(lengths.sum()))
    w = a.warmup
    secs = steps[-1] - steps[w]
    tokens = sum(real[w:])
    print("RESULT " + json.dumps({
        "effective_tokens_per_s": tokens / secs, "effective_tokens_per_cpu_s": tokens / (cpu[-1] - cpu[w]), "timed_steps": len(batches) - w, "step_s": secs / (len(batches) - w),
        "real_tokens": tokens, "first_loss": first_loss, "final_loss": float(loss),
        "params": {"total": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": __import__("peft").__version__ if a.kind == "lora" else None},
        "threads": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
