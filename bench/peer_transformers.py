"""The transformers peer arm of generate_throughput.py: the same LLaMA weights, prompts and batches, greedy
`generate()` on torch CPU. Run by generate_throughput.py with --peer_python (a venv holding torch +
transformers; never a dependency of paddlellm), one JSON job in, one JSON result out:

    python bench/peer_transformers.py job.json result.json

job: {"model": config kwargs, "weights": .npz of the paddle state dict, "prompts": [[ids]], "pad_id", "eos_id",
      "new_tokens", "threads", "plans": {name: [[prompt indices of one batch]]}}
result: {"versions", "plans": {name: {"seconds", "generated_tokens", "tokens_per_second"}}, "replies": {name: [[ids]]}}
"""
from __future__ import annotations

import json
import sys
import time


def load(job):
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = job["model"]
    config = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                         num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
                         max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=m["rms_norm_eps"],
                         rope_theta=m["rope_theta"], tie_word_embeddings=False, pad_token_id=job["pad_id"],
                         eos_token_id=job["eos_id"], bos_token_id=job["bos_id"])
    model = LlamaForCausalLM(config).eval()
    weights = np.load(job["weights"])
    state = {}
    for name in weights.files:
        w = weights[name]
        # paddle nn.Linear stores [in, out]; torch [out, in]. Embeddings and norms are the same layout.
        if name.endswith(".weight") and w.ndim == 2 and "embed_tokens" not in name:
            w = w.T
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def run(model, job, plan):
    import torch

    prompts, pad = job["prompts"], job["pad_id"]
    replies = [None] * len(prompts)
    start = time.perf_counter()
    for idx in plan:
        rows = [prompts[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=job["new_tokens"], do_sample=False,
                                 pad_token_id=pad, eos_token_id=job["eos_id"])
        for i, row in zip(idx, out[:, width:].tolist()):
            reply = []
            for t in row:
                if t == job["eos_id"]:
                    break
                reply.append(t)
            replies[i] = reply
    seconds = time.perf_counter() - start
    tokens = sum(len(r) for r in replies)
    return {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1)}, replies


def main(job_path: str, out_path: str) -> int:
    import torch
    import transformers

    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    model = load(job)
    warm = {"prompts": job["prompts"][:4], "pad_id": job["pad_id"], "eos_id": job["eos_id"], "new_tokens": 4}
    run(model, warm, [[0, 1, 2, 3]])
    result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "threads": job["threads"],
              "plans": {}, "replies": {}}
    for name, plan in job["plans"].items():
        result["plans"][name], result["replies"][name] = run(model, job, plan)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
