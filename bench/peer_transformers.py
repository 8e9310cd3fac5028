"""The transformers peer arm of generate_throughput.py: the same weights (the model folder through `paddlellm
export-hf`), the very inputs our arms feed (left-padded ids and attention mask of every batch), greedy
`generate()` on torch CPU. Run by generate_throughput.py with --peer_python (a venv holding torch +
transformers; never a dependency of paddlellm), one JSON job in, one JSON result out:

    python bench/peer_transformers.py job.json result.json

job: {"hf_dir": the export-hf folder, "batches": {plan name: [{"rows": [prompt indices], "input_ids", "attention_mask"}]},
      "prompts": count, "pad_id", "eos_ids": [stop ids], "new_tokens", "threads"}
result: {"versions", "threads", "plans": {name: {"seconds", "generated_tokens", "tokens_per_second", "tokens_per_cpu_second"}}, "replies": {name: [[ids]]}}
"""
from __future__ import annotations

import json
import sys
import time


def load(job):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32).eval()


def run(model, job, batches):
    import torch

    replies = [None] * job["prompts"]
    stops = set(job["eos_ids"])
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=job["new_tokens"], do_sample=False,
                                 num_beams=1, pad_token_id=job["pad_id"], eos_token_id=job["eos_ids"])
        for i, row in zip(batch["rows"], out[:, ids.shape[1]:].tolist()):
            reply = []
            for t in row:
                if t in stops:
                    break
                reply.append(t)
            replies[i] = reply
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(r) for r in replies if r is not None)
    return {"seconds": round(seconds, 3), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
            "tokens_per_cpu_second": round(tokens / max(cpu, 1e-9), 1)}, replies


def main(job_path: str, out_path: str) -> int:
    import torch
    import transformers

    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    model = load(job)
    first = next(iter(job["batches"].values()))[0]
    warm = dict(job, new_tokens=4)
    run(model, warm, [dict(first, input_ids=first["input_ids"][:4], attention_mask=first["attention_mask"][:4], rows=first["rows"][:4])])
    result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "threads": job["threads"],
              "plans": {}, "replies": {}}
    for name, batches in job["batches"].items():
        result["plans"][name], result["replies"][name] = run(model, job, batches)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
