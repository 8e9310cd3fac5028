"""Request parsing and validation for `paddlellm serve`: JSON bodies of POST /api/chat (PaddleNLP),
POST /v1/chat/completions and POST /v1/completions (OpenAI) become ChatRequests, or an ApiError (HTTP status,
one-line message and the offending parameter)."""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault (OpenAI's error.param), when there is one


# =========================================================================== request parsing
@dataclass(frozen=True)
class Sampling:
    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch. A seeded request is generated alone (its result
        would otherwise depend on what it was batched with)."""
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        return ("sample", self.top_k, self.top_p, self.temperature, self.repetition_penalty, self.seed, secrets.token_hex(8) if self.seed is not None else None)


@dataclass
class ChatRequest:
    """A validated request: the conversation (or, for /v1/completions, a raw prompt), generation limits and sampling."""

    user_turns: List[str]
    bot_turns: List[str]  # replies to user_turns[:-1]
    max_new_tokens: int
    sampling: Sampling
    stream: bool = False
    stop: Tuple[str, ...] = ()
    n: int = 1  # completions to generate for this prompt
    logprobs: Optional[int] = None  # log-probabilities of the generated tokens, with this many alternatives each
    echo: bool = False  # /v1/completions: the reply starts with the prompt (and its log-probabilities)
    prompt_text: Optional[str] = None  # /v1/completions: raw prompt text (no chat format), encoded with special tokens
    prompt_ids: Optional[List[int]] = None  # /v1/completions: the prompt as token ids
    system: Optional[str] = None  # system message(s), joined by newlines (Family.generation_prompt places it)

    @property
    def raw(self) -> bool:
        """A raw completion keeps the generated text as is (a chat reply is stripped)."""
        return self.prompt_text is not None or self.prompt_ids is not None


def loads_json(body: bytes) -> Dict[str, Any]:
    """Parse a request body: a JSON object (NaN/Infinity refused) or ApiError 400."""
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__ if data is not None else 'null'}")
    return data


def _number(data: Dict, key: str, default, kind: type, lo=None, hi=None, lo_open=False):
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:60]}", key)
    value = kind(value)
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ApiError(400, f"{key} must be {rng}, got {value}", key)
    return value


def _flag(data: Dict, key: str, default: bool = False) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value


def parse_sampling(data: Dict, defaults: Sampling, max_length: int, length_keys: Sequence[str], default_new: Optional[int] = None,
                   min_new: int = 1) -> Tuple[int, Sampling]:
    """(max_new_tokens, Sampling) from a request, with the server's defaults for missing fields."""
    max_new = min(default_new or max_length, max_length)
    for key in length_keys:
        if data.get(key) is not None:
            max_new = _number(data, key, max_length, int, lo=min_new)
            if max_new > max_length:
                raise ApiError(400, f"{key} {max_new} exceeds this server's limit of {max_length} new tokens (--max_length)", key)
            break
    seed = data.get("seed")
    if seed is not None:
        seed = _number(data, "seed", None, int, lo=0, hi=2**63 - 1)
    sampling = Sampling(
        top_k=_number(data, "top_k", defaults.top_k, int, lo=0),
        top_p=_number(data, "top_p", defaults.top_p, float, lo=0, hi=1, lo_open=True),
        temperature=_number(data, "temperature", defaults.temperature, float, lo=0, hi=100),
        repetition_penalty=_number(data, "repetition_penalty", defaults.repetition_penalty, float, lo=0, hi=100, lo_open=True),
        seed=seed,
    )
    return max_new, sampling


USER_ROLES, BOT_ROLES = ("user", "human"), ("bot", "assistant")


def _turn_text(turn, where: str, expect: str) -> str:
    """Text of one turn given as a string or a {"role", "utterance"|"content"} object."""
    if isinstance(turn, str):
        return turn
    if isinstance(turn, dict):
        role = turn.get("role")
        if role is not None:
            if not isinstance(role, str) or role not in (USER_ROLES if expect == "user" else BOT_ROLES):
                raise ApiError(400, f"{where} should be a {expect} turn (turns alternate user, bot, ...), got role {json.dumps(role)[:40]}")
        text = turn.get("utterance", turn.get("content"))
        if isinstance(text, str):
            return text
        raise ApiError(400, f"{where}.utterance must be a string")
    raise ApiError(400, f"{where} must be a string or an object with role and utterance, got {type(turn).__name__}")


def parse_chat(data: Dict, defaults: Sampling, max_length: int) -> ChatRequest:
    """POST /api/chat (PaddleNLP): context (the new message, or a list of alternating turns ending with the
    user's) and history (earlier alternating turns: [{"role": "user", "utterance": ..}, {"role": "bot", ..}, ..]
    or plain strings; a JSON string of that list is accepted too, as PaddleNLP's UI sent it)."""
    if "context" not in data:
        raise ApiError(400, "context is required: the user's message (a string) or a list of alternating turns")
    history = data.get("history")
    if history is None or history == "":
        history = []
    if isinstance(history, str):
        try:
            history = json.loads(history)
        except ValueError:
            raise ApiError(400, "history must be a list of turns (or a JSON string of one)") from None
    if not isinstance(history, list):
        raise ApiError(400, f"history must be a list of turns, got {type(history).__name__}")
    context = data["context"]
    if isinstance(context, (str, dict)):
        context = [context]
    if not isinstance(context, list) or not context:
        raise ApiError(400, "context must be a string or a non-empty list of turns")
    turns = history + context
    if len(turns) % 2 != 1:
        raise ApiError(400, f"history + context must alternate user and bot turns and end with a user turn; got {len(history)} + {len(context)} turns")
    texts = [_turn_text(t, f"history[{i}]" if i < len(history) else f"context[{i - len(history)}]", "user" if i % 2 == 0 else "bot") for i, t in enumerate(turns)]
    stream = _flag(data, "stream")
    max_new, sampling = parse_sampling(data, defaults, max_length, ("max_length", "max_new_tokens"))
    return ChatRequest(texts[0::2], texts[1::2], max_new, sampling, stream)


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only text parts are supported ({{\"type\": \"text\", \"text\": ...}})")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts")


def parse_openai(data: Dict, defaults: Sampling, max_length: int, max_logprobs: int = 20) -> ChatRequest:
    """POST /v1/chat/completions: messages of role system/user/assistant. System messages go to the model's
    chat template as its system message, or before the first user message in a family's own format (which
    has no system slot; see Family.generation_prompt); consecutive messages of one role are
    joined with a newline. `n` replies; `logprobs` (true/false) with `top_logprobs` alternatives (at most
    max_logprobs). Unknown fields (model, user, ...) are ignored."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    system, turns = [], []  # turns: [role, text]
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {json.dumps(role)[:40]}")
        text = _message_text(m.get("content"), f"messages[{i}]") if role != "assistant" or m.get("content") is not None else ""
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[0][0] != "user":
        raise ApiError(400, "the conversation must start with a user message (after any system message)")
    if turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message")
    n, stream, stop = _openai_common(data)
    logprobs = None
    if _flag(data, "logprobs"):
        logprobs = _number(data, "top_logprobs", 0, int, lo=0)
        _check_logprobs(logprobs, max_logprobs, "top_logprobs")
    elif data.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    # OpenAI semantics: no top-k unless asked for; temperature 0 = greedy.
    openai_defaults = dataclasses.replace(defaults, top_k=0)
    max_new, sampling = parse_sampling(data, openai_defaults, max_length, ("max_completion_tokens", "max_tokens"))
    return ChatRequest([t for r, t in turns if r == "user"], [t for r, t in turns if r == "assistant"], max_new, sampling, stream, stop,
                       n=n, logprobs=logprobs, system="\n".join(system) if system else None)


def _openai_common(data: Dict) -> Tuple[int, bool, Tuple[str, ...]]:
    """n, stream and stop of an OpenAI request."""
    n = _number(data, "n", 1, int, lo=1, hi=MAX_N)
    stream = _flag(data, "stream")
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    # OpenAI allows 4; evaluation harnesses send a task's stop strings plus the eos token, often more (vLLM: no limit).
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return n, stream, tuple(stop)


MAX_N = 16  # most choices per prompt (each is a row of a batch)
MAX_STOP = 16  # most stop strings per request


def _check_logprobs(k: int, max_logprobs: int, key: str) -> None:
    if k > max_logprobs:
        raise ApiError(400, f"{key} {k} exceeds this server's limit of {max_logprobs} (--max_logprobs)", key)


def parse_completions(data: Dict, defaults: Sampling, max_length: int, max_logprobs: int = 20) -> List[ChatRequest]:
    """POST /v1/completions (OpenAI's legacy text endpoint): one ChatRequest per prompt.

    prompt: a string, a list of strings, a list of token ids or a list of such lists. max_tokens (default
    16, 0 allowed with echo), temperature, top_p, stop, seed, n, stream, echo, and logprobs = the number
    of alternatives reported per token (0 = only the chosen token's). No chat format is applied.
    """
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        prompts: List = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of non-empty lists of token ids", "prompt")
    for p in prompts:
        if isinstance(p, list) and min(p) < 0:
            raise ApiError(400, f"prompt token id {min(p)} is outside the vocabulary (ids are >= 0)", "prompt")
    for key in ("suffix", "logit_bias"):
        if data.get(key):
            raise ApiError(400, f"{key} is not supported by this server", key)
    n, stream, stop = _openai_common(data)
    best_of = data.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError(400, "best_of is not supported by this server (leave it out or equal to n)", "best_of")
    echo = _flag(data, "echo")
    logprobs = _number(data, "logprobs", None, int, lo=0)
    if logprobs is not None:
        _check_logprobs(logprobs, max_logprobs, "logprobs")
    max_new, sampling = parse_sampling(data, dataclasses.replace(defaults, top_k=0), max_length, ("max_tokens",), default_new=16, min_new=0)
    if max_new == 0 and not echo:
        raise ApiError(400, "max_tokens 0 needs echo: true (there would be nothing to return)", "max_tokens")
    return [ChatRequest([], [], max_new, sampling, stream, stop, n=n, logprobs=logprobs, echo=echo,
                        prompt_text=p if isinstance(p, str) else None, prompt_ids=p if isinstance(p, list) else None) for p in prompts]
