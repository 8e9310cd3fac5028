"""OpenAI response shapes for `paddlellm serve`: choices, usage and log-probabilities of finished requests.

Log-probabilities are the model's own: log-softmax of its raw logits (before repetition penalty,
temperature or top-k/top-p, as OpenAI and vLLM report them), in float32. Prompt tokens are scored by one
forward pass over the prompt (the first token has no logprob: null); a generated token by the logits it
was chosen from. Token texts: what each token adds to the text before it (special tokens shown). A stream
sends each piece's tokens with it (and the prompt's with the echoed prompt).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .engine import Engine
from .scheduler import Request


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


def prompt_rows(prompt: List[int], scores: List) -> List[Tuple]:
    """(token, logprob, alternatives) of every prompt token; the first has neither (None)."""
    return [(prompt[0], None, None)] + [(t, lp, _with_chosen(top, t, lp)) for t, (lp, top) in zip(prompt[1:], scores)]


def generated_rows(records: List) -> List[Tuple]:
    return [(t, lp, _with_chosen(top, t, lp)) for t, lp, top in records]


class Logprobs:
    """Formats the log-probabilities of one choice, in pieces (a stream) or at once. Token texts are decoded
    in the context of the tokens before them; text_offset counts on over the pieces."""

    def __init__(self, engine: Engine, context: List[int]):
        self.engine = engine
        self.context = list(context)
        self.offset = 0

    def _texts(self, rows: List[Tuple]):
        texts, alts = self.engine.token_texts([r[0] for r in rows], [[t for t, _ in (r[2] or [])] for r in rows], self.context)
        self.context += [r[0] for r in rows]
        return texts, alts

    def completion(self, rows: List[Tuple]) -> Dict:
        """/v1/completions: {tokens, token_logprobs, top_logprobs, text_offset}."""
        texts, alts = self._texts(rows)
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        top_logprobs: List[Optional[Dict[str, float]]] = []
        for (_, _, top), names in zip(rows, alts):
            if top is None:
                top_logprobs.append(None)
                continue
            entry: Dict[str, float] = {}
            for (_, lp), name in zip(top, names):
                entry.setdefault(name, lp)  # two ids with one text: keep the likelier (entries come best first)
            top_logprobs.append(entry)
        return {"tokens": texts, "token_logprobs": [r[1] for r in rows], "top_logprobs": top_logprobs, "text_offset": offsets}

    def chat(self, records: List) -> Dict:
        """/v1/chat/completions: {"content": [{token, logprob, bytes, top_logprobs}]} (k alternatives, as asked)."""
        texts, alts = self._texts([(t, lp, top) for t, lp, top in records])
        content = []
        for (_, lp, top), text, names in zip(records, texts, alts):
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": name, "logprob": v, "bytes": list(name.encode("utf-8"))} for (_, v), name in zip(top, names)]})
        return {"content": content}


def completion_logprobs(engine: Engine, req: Request, info: Dict) -> Optional[Dict]:
    """choices[i].logprobs of /v1/completions: {tokens, token_logprobs, top_logprobs, text_offset}; with
    echo the prompt's tokens come first (the first one's logprob and top_logprobs are null). text_offset:
    where each token's text starts, counted over the token texts (as vLLM does)."""
    if req.logprobs is None:
        return None
    echo = info["prompt_logprobs"] is not None
    rows = (prompt_rows(req.prompt, info["prompt_logprobs"]) if echo else []) + generated_rows(info["logprobs"])
    return Logprobs(engine, [] if echo else req.prompt).completion(rows)


def chat_logprobs(engine: Engine, req: Request, info: Dict) -> Optional[Dict]:
    """choices[i].logprobs of /v1/chat/completions: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if req.logprobs is None:
        return None
    return Logprobs(engine, req.prompt).chat(info["logprobs"])
