"""The acceptance report of a quantization: float vs quantized on the dev data, sizes, reload check.

On small models the dev loss moves by noise; KL(float||quantized) per supervised token and top-1
agreement with the float model are the signals that separate methods, so they are always reported.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

KL_WARN = 0.05  # per-token KL above this: warn loudly
TOP1_WARN = 0.95  # top-1 agreement with the float model below this: warn loudly


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def supervised_logprobs(model, family, examples, pad_id: int, batch_size: int):
    """(log-probabilities [N, V] at the N supervised positions, their labels [N]) over `examples`."""
    import paddle

    from ..families import IGNORE, logits_of

    lps, labels = [], []
    with paddle.no_grad():
        for i in range(0, len(examples), batch_size):
            arrays = family.build_batch([[e] for e in examples[i:i + batch_size]], pad_id)
            lab = arrays.pop("labels")
            logits = logits_of(model(**{k: paddle.to_tensor(v) for k, v in arrays.items()})).astype("float32").numpy()
            mask = lab != IGNORE
            lps.append(log_softmax(logits[mask]))
            labels.append(lab[mask])
    return np.concatenate(lps), np.concatenate(labels)


def token_metrics(lp: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    loss = float(-lp[np.arange(len(labels)), labels].mean())
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": float((lp.argmax(-1) == labels).mean())}


def agreement(lp_float: np.ndarray, lp_quant: np.ndarray) -> Dict[str, float]:
    kl = float((np.exp(lp_float) * (lp_float - lp_quant)).sum(-1).mean())
    return {"kl_per_token": max(kl, 0.0), "top1_agreement": float((lp_float.argmax(-1) == lp_quant.argmax(-1)).mean())}


class Evaluator:
    """Measures the float model once (before it is quantized in place), then the quantized one against it."""

    def __init__(self, family, tokenizer, records, examples, src_length: int, tgt_length: int, batch_size: int, generate: bool = True):
        self.family, self.tokenizer = family, tokenizer
        self.records, self.examples = records, examples
        self.src_length, self.tgt_length, self.batch_size = src_length, tgt_length, batch_size
        self.generate = generate
        self.float_lp = self.labels = None
        self.float_replies: Optional[List[str]] = None

    def _replies(self, model) -> Optional[List[str]]:
        if not self.generate:
            return None
        from ..generation import generate_replies

        return generate_replies(model, self.tokenizer, self.family, self.records, self.src_length, self.tgt_length, self.batch_size)

    def measure_float(self, model) -> None:
        self.float_lp, self.labels = supervised_logprobs(model, self.family, self.examples, self.tokenizer.pad_token_id, self.batch_size)
        self.float_replies = self._replies(model)

    def compare(self, model) -> Dict:
        lp, _ = supervised_logprobs(model, self.family, self.examples, self.tokenizer.pad_token_id, self.batch_size)
        out = {"examples": len(self.examples), "supervised_tokens": int(len(self.labels)),
               "float": token_metrics(self.float_lp, self.labels), "quantized": token_metrics(lp, self.labels)}
        out.update(agreement(self.float_lp, lp))
        replies = self._replies(model)
        if replies is not None:
            refs = [r.tgt[len(r.src) - 1] if len(r.tgt) >= len(r.src) else None for r in self.records]
            scored = [i for i, ref in enumerate(refs) if ref is not None]
            em = lambda rs: sum(rs[i].strip() == refs[i].strip() for i in scored) / max(len(scored), 1)  # noqa: E731
            out["float"]["exact_match"] = em(self.float_replies)
            out["quantized"]["exact_match"] = em(replies)
            out["greedy_agreement"] = sum(a == b for a, b in zip(self.float_replies, replies)) / max(len(replies), 1)
        return out


def warnings_for(dev: Optional[Dict]) -> List[str]:
    if not dev:
        return []
    out = []
    if dev["kl_per_token"] > KL_WARN:
        out.append(f"KL(float||quantized) per token is {dev['kl_per_token']:.3g} > {KL_WARN}: the quantized model's predictions differ noticeably")
    if dev["top1_agreement"] < TOP1_WARN:
        out.append(f"top-1 agreement with the float model is {100 * dev['top1_agreement']:.1f}% < {100 * TOP1_WARN:.0f}%")
    return out


def format_report(r: Dict) -> str:
    """The printed table of quant_results.json."""
    lines = [f"quant: {r['quant_type']} by {r['method'].upper()} ({r['bits']} bit weights, per-channel) on {r['quantized_layers']} Linear layers; "
             "embeddings, norms and the LM head kept float32"]
    c = r["calibration"]
    lines.append(f"calibration: {c['examples_used']} examples from {c['file']} ({c['batches']} batches x {c['batch_size']}); {r['seconds']:.1f} s")
    dev = r.get("dev")
    if dev:
        f, q = dev["float"], dev["quantized"]
        lines.append(f"dev ({dev['examples']} examples, {dev['supervised_tokens']} supervised tokens)   float32          quantized")
        lines.append(f"  loss / ppl                     {f['loss']:.4f} / {f['ppl']:.3f}   {q['loss']:.4f} / {q['ppl']:.3f}")
        lines.append(f"  token accuracy                 {100 * f['accuracy']:6.2f}%          {100 * q['accuracy']:6.2f}%")
        lines.append(f"  KL(float||quant) per token     -                {dev['kl_per_token']:.3g}")
        lines.append(f"  top-1 agreement with float     -                {100 * dev['top1_agreement']:.2f}%")
        if "exact_match" in f:
            lines.append(f"  greedy exact match             {100 * f['exact_match']:6.1f}%          {100 * q['exact_match']:6.1f}%   "
                         f"(same reply as float: {100 * dev['greedy_agreement']:.1f}%)")
    else:
        lines.append("dev: no dev.json in the data folder; quality not measured")
    s = r["size"]
    lines.append(f"size: weights {s['float_bytes'] / 1e6:.2f} MB (float32) -> {s['quantized_bytes'] / 1e6:.2f} MB ({s['ratio']:.3f}x); "
                 f"{s['quantized_params']:,} of {s['total_params']:,} parameters quantized")
    rc = r["reload_check"]
    lines.append(f"reload check: {rc['file']} loaded as predict loads it: logits {'identical' if rc['max_abs_diff'] == 0 else 'DIFFER'} "
                 f"(max |diff| {rc['max_abs_diff']:.3g}; int8-resident runtime max |diff| {rc['int8_runtime_max_abs_diff']:.3g})")
    return "\n".join(lines)
