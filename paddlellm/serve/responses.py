"""OpenAI response shapes for `paddlellm serve`: choices, usage and log-probabilities of finished requests.

Log-probabilities are the model's own: log-softmax of its raw logits (before repetition penalty,
temperature or top-k/top-p, as OpenAI and vLLM report them), in float32. Prompt tokens are scored by one
forward pass over the prompt (the first token has no logprob: null); a generated token by the logits it
was chosen from. Token texts: what each token adds to the text before it (special tokens shown).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .engine import Engine, Request


def finish_reason(info: Dict) -> str:
    return "length" if info["finish_reason"] == "length" else "stop"


def usage(infos: List[Dict], prompts: List[int]) -> Dict[str, int]:
    """Usage of a call: every prompt counted once (n choices share it), every completion token."""
    prompt_tokens = sum(prompts)
    completion_tokens = sum(i["completion_tokens"] for i in infos)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _with_chosen(top: List, token: int, logprob: float) -> List:
    """The k best alternatives plus the chosen token when it is not among them (OpenAI: up to k+1 entries)."""
    return top if any(t == token for t, _ in top) else top + [(token, logprob)]


def completion_logprobs(engine: Engine, req: Request, info: Dict) -> Optional[Dict]:
    """choices[i].logprobs of /v1/completions: {tokens, token_logprobs, top_logprobs, text_offset}; with
    echo the prompt's tokens come first (the first one's logprob and top_logprobs are null). text_offset:
    where each token's text starts, counted over the token texts (as vLLM does)."""
    if req.logprobs is None:
        return None
    rows = []  # (token, logprob or None, alternatives or None)
    if info["prompt_logprobs"] is not None:
        p = req.prompt
        rows.append((p[0], None, None))
        rows += [(t, lp, _with_chosen(top, t, lp)) for t, (lp, top) in zip(p[1:], info["prompt_logprobs"])]
    context = req.prompt if info["prompt_logprobs"] is None else ()
    rows += [(t, lp, _with_chosen(top, t, lp)) for t, lp, top in info["logprobs"]]
    texts, alts = engine.token_texts([r[0] for r in rows], [[t for t, _ in (r[2] or [])] for r in rows], context)
    offsets, pos = [], 0
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    top_logprobs = []
    for (_, _, top), names in zip(rows, alts):
        if top is None:
            top_logprobs.append(None)
            continue
        entry: Dict[str, float] = {}
        for (_, lp), name in zip(top, names):
            entry.setdefault(name, lp)  # two ids with one text: keep the likelier (entries come best first)
        top_logprobs.append(entry)
    return {"tokens": texts, "token_logprobs": [r[1] for r in rows], "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(engine: Engine, req: Request, info: Dict) -> Optional[Dict]:
    """choices[i].logprobs of /v1/chat/completions: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if req.logprobs is None:
        return None
    gen = info["logprobs"]
    texts, alts = engine.token_texts([t for t, _, _ in gen], [[a for a, _ in top] for _, _, top in gen], req.prompt)
    content = []
    for (t, lp, top), text, names in zip(gen, texts, alts):
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": name, "logprob": v, "bytes": list(name.encode("utf-8"))} for (_, v), name in zip(top, names)]})
    return {"content": content}
