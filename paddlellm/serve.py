"""HTTP API (PaddleNLP-style and OpenAI-compatible, streaming) and a Gradio chat UI for one model.

    python flask_server.py --model_name_or_path DIR [--flask_port 8010] [--port 8011] [--api_key KEY] ...
    python -m paddle.distributed.launch --nproc_per_node N flask_server.py ...   (rank 0 serves HTTP)

Endpoints (on --flask_port): POST /api/chat (PaddleNLP), POST /v1/chat/completions (OpenAI, `stream`
gives server-sent events), GET /v1/models, GET /health. The Gradio chat UI listens on --port.

How it works: the main thread owns the model (paddle's generate is not thread-safe). HTTP handler
threads validate a request, build its prompt with the chat format the model was fine-tuned with
(family.generation_prompt, as predict_generation.py) and put it on a bounded queue (full -> 429).
The model thread takes the oldest request plus up to max_batch_size-1 waiting requests with the same
sampling parameters and generates them as one left-padded batch with paddlenlp's generate(). A
streamer hands every new token to its request, which sends the text that is new since its last piece
(multi-byte characters arrive whole; the pieces join to exactly the reply). A logits processor ends
a row early (forces its stop token) when its own max_length is reached, its client went away or a stop
string appeared. Under paddle.distributed.launch rank 0 broadcasts every batch (prompt ids and
parameters) to the other ranks, which run the same generation in lock step.
"""
from __future__ import annotations

import dataclasses
import hmac
import inspect
import itertools
import json
import logging
import math
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .arguments import UserError, fail, parse_args

log = logging.getLogger("paddlellm.serve")
STOP_OP, NOOP_OP, GENERATE_OP = "stop", "noop", "generate"


@dataclass
class ServeArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model folder or name; a LoRA / prefix output folder alone is enough (it records its base model)."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter folder to apply to the base model."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Prefix-tuning folder to apply to the base model."})
    dtype: Optional[str] = field(default=None, metadata={"help": "float32, float16 or bfloat16 (default: the fine-tuning dtype, else float32).", "choices": ["float32", "float16", "bfloat16"]})
    device: str = field(default="auto", metadata={"help": "cpu, gpu, or auto (gpu when paddle was built with CUDA).", "choices": ["auto", "cpu", "gpu"]})
    src_length: Optional[int] = field(default=None, metadata={"help": "Maximum prompt tokens (earlier turns + final message; oldest turns are dropped first). Default: the fine-tuning src_length, else 1024."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Maximum new tokens of a reply: the default and the upper limit of a request's max_length / max_tokens (larger -> 400). Default: the fine-tuning tgt_length, else 512."})
    top_k: int = field(default=1, metadata={"help": "Default top_k of /api/chat and the UI (1 = greedy). /v1/chat/completions follows OpenAI: no top-k unless the request gives one."})
    top_p: float = field(default=1.0, metadata={"help": "Default top_p (nucleus sampling)."})
    temperature: float = field(default=1.0, metadata={"help": "Default temperature (0 = greedy)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Default repetition penalty (1.0 = none)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind the API and the UI to (0.0.0.0 = every interface; do that only behind a firewall or with --api_key)."})
    flask_port: int = field(default=8010, metadata={"help": "Port of the HTTP API."})
    port: int = field(default=8011, metadata={"help": "Port of the Gradio chat UI."})
    ui: bool = field(default=True, metadata={"help": "Start the Gradio chat UI (--ui false: API only)."})
    title: str = field(default="paddlellm chat", metadata={"help": "Title of the chat UI page."})
    model_name: Optional[str] = field(default=None, metadata={"help": "Model name reported by the OpenAI endpoints (default: the model folder's name)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "Require this key on every endpoint (header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'; the UI asks for it as the password). Default: $PADDLELLM_API_KEY, else no key."})
    max_batch_size: int = field(default=8, metadata={"help": "Most requests generated together in one batch (same sampling parameters)."})
    max_queue: int = field(default=64, metadata={"help": "Most requests waiting for the model; more are answered 429."})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "How long the model thread waits for more compatible requests before starting a batch that is not full."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body accepted (larger -> 413)."})
    debug_step_delay: float = field(default=0.0, metadata={"help": "TESTING ONLY: sleep this many seconds per generated token (makes queueing deterministic in tests)."})


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
    """A validated request: the conversation, generation limits and sampling."""

    user_turns: List[str]
    bot_turns: List[str]  # replies to user_turns[:-1]
    max_new_tokens: int
    sampling: Sampling
    stream: bool = False
    stop: Tuple[str, ...] = ()


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
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:60]}")
    value = kind(value)
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ApiError(400, f"{key} must be {rng}, got {value}")
    return value


def parse_sampling(data: Dict, defaults: Sampling, max_length: int, length_keys: Sequence[str]) -> Tuple[int, Sampling]:
    """(max_new_tokens, Sampling) from a request, with the server's defaults for missing fields."""
    max_new = max_length
    for key in length_keys:
        if data.get(key) is not None:
            max_new = _number(data, key, max_length, int, lo=1)
            if max_new > max_length:
                raise ApiError(400, f"{key} {max_new} exceeds this server's limit of {max_length} new tokens (--max_length)")
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
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
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


def parse_openai(data: Dict, defaults: Sampling, max_length: int) -> ChatRequest:
    """POST /v1/chat/completions: messages of role system/user/assistant. System messages are put before
    the first user message (the chat formats have no system slot); consecutive messages of one role are
    joined with a newline. Unknown fields (model, user, ...) are ignored."""
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
    if system:
        turns[0][1] = "\n".join(system + [turns[0][1]])
    n = data.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, "n must be 1")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them")
    # OpenAI semantics: no top-k unless asked for; temperature 0 = greedy.
    openai_defaults = dataclasses.replace(defaults, top_k=0)
    max_new, sampling = parse_sampling(data, openai_defaults, max_length, ("max_completion_tokens", "max_tokens"))
    return ChatRequest([t for r, t in turns if r == "user"], [t for r, t in turns if r == "assistant"], max_new, sampling, stream, tuple(stop))


# =========================================================================== text streaming
class TextStream:
    """Turns a growing reply (token ids) into text pieces whose concatenation is the reply.

    The reply is `decode(ids)` (generation.decode: special tokens skipped, stripped), cut at the first
    stop string. While it grows, only a window of the last tokens is decoded at each step (the way
    text-generation-inference does it, so a long reply costs O(1) per step, not O(length)): the text
    of ids[prefix_offset:] minus that of ids[prefix_offset:read_offset] is new, unless it ends in U+FFFD
    (an incomplete multi-byte character). Held back as well: leading/trailing whitespace (the reply is
    stripped) and any tail that may be the start of a stop string. The last update decodes the whole
    reply once, and only its remainder goes out.
    """

    def __init__(self, decode: Callable[[List[int]], str], decode_raw: Optional[Callable[[List[int]], str]] = None,
                 stop: Sequence[str] = ()):
        self.decode = decode
        self.decode_raw = decode_raw or decode  # without strip(): windows must keep their spaces
        self.stop = [s for s in stop if s]
        self.prefix_offset = self.read_offset = 0
        self.raw = ""  # text of the reply so far, as grown from window differences
        self.sent = ""  # concatenation of the pieces handed out
        self.text = ""  # the reply as decoded last (cut at a stop string)
        self.stopped = False  # a stop string was found

    def update(self, ids: List[int], final: bool = False) -> str:
        """The new piece of text after the reply grew to `ids` ('' when nothing new is certain yet)."""
        if self.stopped:
            return ""
        if final:
            text = self.decode(ids)
        else:
            prefix = self.decode_raw(ids[self.prefix_offset:self.read_offset])
            window = self.decode_raw(ids[self.prefix_offset:])
            if len(window) > len(prefix) and not window.endswith("\ufffd") and window.startswith(prefix):
                self.raw += window[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            text = self.raw.strip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, self.stopped, final = text[: min(cuts)], True, True
        self.text = text
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._partial_stop(text)]
        if not text.startswith(self.sent):  # the window decoding disagreed with the full decode: never retract
            if final:
                log.warning("streamed text %r is not a prefix of the reply %r", self.sent[-40:], text[-40:])
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


# =========================================================================== requests and the queue
_ids = itertools.count(1)


class Request:
    """One request in flight. The model thread writes events; the HTTP (or UI) thread reads them:
    ("piece", text), then ("done", info) or ("error", (status, message))."""

    def __init__(self, chat: ChatRequest, prompt: List[int], max_new_tokens: int, decode: Callable[[List[int]], str],
                 decode_raw: Optional[Callable[[List[int]], str]] = None):
        self.id = next(_ids)
        self.chat = chat
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.key = chat.sampling.batch_key()
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.text = TextStream(decode, decode_raw, chat.stop)
        self.created = time.time()

    def events_until_done(self, client_gone: Callable[[], bool], cancel: Callable[["Request"], None], poll: float = 0.25) -> Iterator[Tuple[str, Any]]:
        """Yield events until done/error; cancel the request (freeing its slot) if the client goes away."""
        while True:
            try:
                ev = self.events.get(timeout=poll)
            except queue.Empty:
                if client_gone():
                    cancel(self)
                    return
                continue
            yield ev
            if ev[0] in ("done", "error"):
                return


class Scheduler:
    """A bounded FIFO of waiting requests; the model thread takes batches of compatible ones."""

    def __init__(self, max_queue: int, max_batch_size: int, batch_wait: float):
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.cond = threading.Condition()
        self.waiting: deque = deque()
        self.running: set = set()
        self.closed = False
        self.served = 0
        self.batches = 0
        self.largest_batch = 0

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"too many requests: {len(self.waiting)} are waiting (--max_queue {self.max_queue}); retry later")
            self.waiting.append(req)
            self.cond.notify_all()

    def cancel(self, req: Request) -> None:
        """The client went away: drop it from the queue (freeing its slot) or let the model thread end its row."""
        req.cancelled.set()
        with self.cond:
            if req in self.waiting:
                self.waiting.remove(req)
                self.cond.notify_all()

    def finished(self, req: Request) -> None:
        with self.cond:
            if req in self.running:
                self.running.discard(req)
                self.served += 1

    def next_batch(self, timeout: float) -> List[Request]:
        """The oldest waiting request plus compatible ones (same sampling), or [] after `timeout` idle seconds."""
        with self.cond:
            if not self.waiting and not self.closed:
                self.cond.wait(timeout)
            if not self.waiting or self.closed:
                return []
            head = self.waiting.popleft()
            batch = [head]
            deadline = time.monotonic() + self.batch_wait
            while True:
                for req in list(self.waiting):
                    if len(batch) >= self.max_batch_size:
                        break
                    if req.key == head.key:
                        self.waiting.remove(req)
                        batch.append(req)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or left <= 0 or self.closed:
                    break
                self.cond.wait(left)
            self.running.update(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> List[Request]:
        with self.cond:
            self.closed = True
            left = list(self.waiting)
            self.waiting.clear()
            self.cond.notify_all()
            return left

    def stats(self) -> Dict[str, int]:
        with self.cond:
            return {"queued": len(self.waiting), "running": len(self.running), "served": self.served,
                    "batches": self.batches, "largest_batch": self.largest_batch}


# =========================================================================== distributed hand-off
class Channel:
    """Rank 0 -> every other rank: JSON messages (a length, then the bytes) and per-step stop flags,
    sent with paddle.distributed.broadcast (gloo on CPU, NCCL on GPUs)."""

    def __init__(self):
        import paddle.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def send(self, obj: Dict) -> None:
        import numpy as np
        import paddle

        data = json.dumps(obj).encode("utf-8")
        self.dist.broadcast(paddle.to_tensor([len(data)], dtype="int64"), src=0)
        self.dist.broadcast(paddle.to_tensor(np.frombuffer(data, dtype="uint8").copy()), src=0)

    def recv(self) -> Dict:
        import paddle

        n = paddle.zeros([1], dtype="int64")
        self.dist.broadcast(n, src=0)
        buf = paddle.zeros([int(n.item())], dtype="uint8")
        self.dist.broadcast(buf, src=0)
        return json.loads(buf.numpy().tobytes().decode("utf-8"))

    def sync_flags(self, flags) -> Any:
        """Rank 0's flags (a numpy int32 vector) on every rank."""
        import paddle

        t = paddle.to_tensor(flags, dtype="int32")
        self.dist.broadcast(t, src=0)
        return t.numpy()


# =========================================================================== generation
class _BatchSink:
    """Rank 0's view of a running batch: collects each row's tokens, streams text, finishes rows."""

    def __init__(self, engine: "Engine", reqs: List[Request]):
        self.engine = engine
        self.reqs = reqs
        self.tokens: List[List[int]] = [[] for _ in reqs]
        self.done = [False] * len(reqs)
        self.seen = 0  # generated steps already taken in

    def feed(self, cols) -> None:
        """Take in new generated steps: cols is [batch, k] token ids."""
        stop = self.engine.stop_id
        for b, req in enumerate(self.reqs):
            if self.done[b]:
                continue
            natural_stop = False
            for t in cols[b]:
                t = int(t)
                if t == stop:
                    natural_stop = True
                    break
                self.tokens[b].append(t)
                if len(self.tokens[b]) >= req.max_new_tokens:
                    break
            if req.chat.stream or req.text.stop:  # otherwise the reply is decoded once, when it ends
                piece = self.engine.decode_piece(req, self.tokens[b])
                if piece and req.chat.stream:
                    req.events.put(("piece", piece))
            if req.text.stopped or natural_stop:
                self.finish_row(b, "stop")
            elif len(self.tokens[b]) >= req.max_new_tokens:
                self.finish_row(b, "length")
            elif req.cancelled.is_set():
                self.finish_row(b, "cancelled")
        self.seen += len(cols[0]) if len(cols) else 0

    def finish_row(self, b: int, reason: str) -> None:
        req = self.reqs[b]
        self.done[b] = True
        piece = self.engine.decode_piece(req, self.tokens[b], final=True)
        if piece and req.chat.stream:
            req.events.put(("piece", piece))
        info = {"text": req.text.sent if req.chat.stream else req.text.text, "finish_reason": reason,
                "prompt_tokens": len(req.prompt), "completion_tokens": len(self.tokens[b])}
        req.events.put(("done", info))
        self.engine.tokens_generated += len(self.tokens[b])
        self.engine.on_finished(req)

    def forced(self) -> List[bool]:
        """Rows to end now: finished here (e.g. a stop string), or the client went away. (Forcing a row that
        already produced its stop token is harmless: generate() pads finished rows anyway.)"""
        return [d or r.cancelled.is_set() or r.text.stopped for r, d in zip(self.reqs, self.done)]

    # paddlenlp streamer interface: put() gets [batch, 1] next tokens after every step.
    def put(self, value) -> None:
        self.feed(value.numpy())

    def end(self) -> None:
        pass


class _RowControl:
    """A logits processor that forces the stop token for rows that must end: a row that reached its own
    max_new_tokens (rows of one batch may ask for different lengths) or, on rank 0's say, a client that
    went away / a stop string. Also feeds the sink when the decode path has no streamer support."""

    def __init__(self, engine: "Engine", origin_len: int, max_new: List[int], sink: Optional[_BatchSink], feed_sink: bool):
        self.engine = engine
        self.origin_len = origin_len
        self.max_new = max_new
        self.sink = sink
        self.feed_sink = feed_sink

    def __call__(self, input_ids, logits):
        import numpy as np
        import paddle

        eng = self.engine
        if eng.step_delay:
            time.sleep(eng.step_delay)
        generated = input_ids.shape[1] - self.origin_len
        if self.sink is not None and self.feed_sink and generated > self.sink.seen:
            self.sink.feed(input_ids[:, self.origin_len + self.sink.seen:].numpy())
        flags = np.array(self.sink.forced() if self.sink is not None else [False] * len(self.max_new), dtype="int32")
        if eng.channel is not None:
            flags = eng.channel.sync_flags(flags)
        end = [bool(f) or generated >= m for f, m in zip(flags, self.max_new)]
        if not any(end):
            return logits
        mask = np.zeros(logits.shape, dtype=bool)
        mask[end, :] = True
        mask[end, eng.stop_id] = False
        return paddle.where(paddle.to_tensor(mask), paddle.full_like(logits, float("-inf")), logits)


class Engine:
    """Owns the model. Rank 0 runs batches from the Scheduler; other ranks follow rank 0's broadcasts."""

    def __init__(self, model, tokenizer, family, src_length: int, channel: Optional[Channel] = None, step_delay: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.src_length = src_length
        self.channel = channel
        self.step_delay = step_delay
        self.stop_id = family.stop_token_id(tokenizer)
        _cache_special_ids(tokenizer)
        self.lock = threading.Lock()  # the tokenizer is shared by HTTP threads and the model thread
        self.scheduler: Optional[Scheduler] = None
        config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self._inputs_take_length = "max_new_tokens" in inspect.signature(family.generation_inputs).parameters
        self.tokens_generated = 0  # reply tokens handed out (rank 0)
        self.last_steps = 0  # decode steps of the last batch

    # ------------------------------------------------------------------ called from HTTP / UI threads
    def make_request(self, chat: ChatRequest) -> Request:
        from .generation import decode

        with self.lock:
            prompt = self.family.generation_prompt(self.tokenizer, chat.user_turns, chat.bot_turns, self.src_length)
        max_new = chat.max_new_tokens
        if self.max_positions:  # never generate past the position table
            max_new = max(1, min(max_new, self.max_positions - len(prompt)))

        def dec(ids: List[int]) -> str:
            with self.lock:
                return decode(self.tokenizer, ids)

        def dec_raw(ids: List[int]) -> str:  # generation.decode without its strip()
            with self.lock:
                return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

        return Request(chat, prompt, max_new, dec, dec_raw)

    def decode_piece(self, req: Request, ids: List[int], final: bool = False) -> str:
        return req.text.update(ids, final)

    def on_finished(self, req: Request) -> None:
        if self.scheduler is not None:
            self.scheduler.finished(req)

    # ------------------------------------------------------------------ the model thread
    def serve(self, scheduler: Scheduler, stopping: threading.Event, heartbeat: float = 10.0) -> None:
        """Rank 0's loop: take batches and generate until `stopping` is set."""
        self.scheduler = scheduler
        while not stopping.is_set():
            batch = [r for r in scheduler.next_batch(timeout=min(heartbeat, 1.0)) if not self._drop_cancelled(r)]
            if not batch:
                if self.channel is not None and time.monotonic() - getattr(self, "_last_send", 0) > heartbeat:
                    self._send({"op": NOOP_OP})  # keeps idle collectives from timing out
                continue
            self.run_batch(batch)
        for req in scheduler.close():
            req.events.put(("error", (503, "the server is shutting down")))
        if self.channel is not None:
            self._send({"op": STOP_OP})

    def _drop_cancelled(self, req: Request) -> bool:
        if req.cancelled.is_set():
            self.scheduler.finished(req)
            return True
        return False

    def _send(self, msg: Dict) -> None:
        self._last_send = time.monotonic()
        self.channel.send(msg)

    def run_batch(self, reqs: List[Request]) -> None:
        s = reqs[0].chat.sampling
        job = {"op": GENERATE_OP, "prompts": [r.prompt for r in reqs], "max_new": [r.max_new_tokens for r in reqs],
               "sampling": dataclasses.asdict(s), "seed": s.seed if s.seed is not None else secrets.randbelow(2**31)}
        sink = _BatchSink(self, reqs)
        try:
            if self.channel is not None:
                self._send(job)
            self.generate(job, sink)
        except Exception as e:  # a failed batch answers its requests with 500; the server goes on
            log.error("generation failed:\n%s", traceback.format_exc())
            for b, req in enumerate(reqs):
                if not sink.done[b]:
                    sink.done[b] = True
                    req.events.put(("error", (500, f"generation failed: {type(e).__name__}: {e}")))
                    self.on_finished(req)

    def follow(self) -> None:
        """Other ranks' loop: run every batch rank 0 broadcasts, until it says stop."""
        while True:
            job = self.channel.recv()
            if job["op"] == STOP_OP:
                return
            if job["op"] == GENERATE_OP:
                try:
                    self.generate(job, None)
                    log.info("rank %d: generated a batch of %d", self.channel.rank, len(job["prompts"]))
                except Exception:
                    log.error("rank %d: generation failed:\n%s", self.channel.rank, traceback.format_exc())

    def generate(self, job: Dict, sink: Optional[_BatchSink]) -> None:
        """Generate one batch, as generation.generate_ids does (same inputs and decode settings), streaming
        each step's tokens to the sink (rank 0) and ending rows early through _RowControl."""
        import paddle

        prompts, max_new = job["prompts"], job["max_new"]
        s = Sampling(**job["sampling"])
        extra = {"max_new_tokens": max(max_new)} if self._inputs_take_length else {}
        inputs = {k: paddle.to_tensor(v) for k, v in self.family.generation_inputs(self.tokenizer, prompts, **extra).items()}
        origin_len = inputs["input_ids"].shape[1]
        # max_length too: paddlenlp replaces a max_new_tokens equal to its default (20) by the model's max_length.
        kwargs: Dict[str, Any] = dict(max_new_tokens=max(max_new), max_length=max(max_new), eos_token_id=self.stop_id,
                                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True, repetition_penalty=s.repetition_penalty)
        if s.greedy:
            kwargs["decode_strategy"] = "greedy_search"
            strategy = "greedy_search"
        else:
            paddle.seed(job["seed"])
            kwargs.update(decode_strategy="sampling", top_k=max(s.top_k, 0), top_p=s.top_p, temperature=s.temperature)
            strategy = "sample"
        streams = _accepts_streamer(self.model, strategy)
        kwargs["logits_processors"] = _processor_list([_RowControl(self, origin_len, max_new, sink, feed_sink=not streams)])
        if streams and sink is not None:
            kwargs["streamer"] = sink
        with paddle.no_grad():
            out = self.model.generate(**inputs, **kwargs)
        ids = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
        self.last_steps = ids.shape[1]
        if sink is not None:
            if ids.shape[1] > sink.seen:
                sink.feed(ids[:, sink.seen:])
            for b in range(len(sink.reqs)):
                if not sink.done[b]:
                    sink.finish_row(b, "cancelled" if sink.reqs[b].cancelled.is_set() else "length")


def _cache_special_ids(tokenizer) -> None:
    """Make decode() 3-10x faster without changing its result: paddlenlp recomputes all_special_ids (from the
    special-tokens map) for every token decoded; streaming decodes every reply at every step. The special
    tokens do not change while serving, so the tokenizer gets a subclass that answers from a cached list."""
    cls = type(tokenizer)
    if getattr(cls, "_paddlellm_cached_special_ids", False):
        return
    ids = list(tokenizer.all_special_ids)
    tokenizer.__class__ = type(cls.__name__, (cls,), {"all_special_ids": property(lambda self: ids), "_paddlellm_cached_special_ids": True,
                                                      "__module__": cls.__module__})


def _processor_list(processors):
    """A paddlenlp LogitsProcessorList of `processors`.

    paddlenlp 3.0.0b4's generate() breaks on custom processors: get_logits_processor() iterates the
    list and calls .extend(), neither of which LogitsProcessorList implements. Add both (once).
    """
    from paddlenlp.generation import LogitsProcessorList

    if not hasattr(LogitsProcessorList, "__iter__"):
        LogitsProcessorList.__iter__ = lambda self: iter(list(self._processors.values()))
    if not hasattr(LogitsProcessorList, "extend"):
        LogitsProcessorList.extend = lambda self, more: [self.append(p) for p in more] and None
    return LogitsProcessorList(processors)


def _accepts_streamer(model, strategy: str) -> bool:
    """Whether the model's decode loop takes a streamer (bloom's own sample() does not)."""
    base = model
    while not hasattr(type(base), strategy) and hasattr(base, "model"):
        base = base.model  # LoRA / prefix wrappers
    fn = getattr(type(base), strategy, None)
    return fn is not None and "streamer" in inspect.signature(fn).parameters


# =========================================================================== HTTP
def error_body(status: int, message: str) -> Dict:
    """One error shape for both APIs: PaddleNLP's error_code/error_msg and OpenAI's error object."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error_code": status, "error_msg": message, "error": {"message": message, "type": kind, "code": status}}


class ServerState:
    def __init__(self, args: ServeArgument, model_name: str):
        self.args = args
        self.model_name = model_name
        self.engine: Optional[Engine] = None  # None while the model loads
        self.scheduler = Scheduler(args.max_queue, args.max_batch_size, args.batch_wait_ms / 1000.0)
        self.defaults = Sampling(args.top_k, args.top_p, args.temperature, args.repetition_penalty)
        self.started = time.time()

    def submit(self, chat: ChatRequest) -> Request:
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry shortly")
        try:
            req = self.engine.make_request(chat)
        except Exception as e:  # e.g. text the tokenizer cannot encode (lone surrogates)
            raise ApiError(400, f"cannot encode the conversation: {type(e).__name__}: {e}") from None
        self.scheduler.submit(req)
        return req


def _client_gone(sock) -> bool:
    """True when the client closed its connection (the socket reads as end-of-file)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def create_app(state: ServerState):
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("paddlellm.serve")
    app.config["MAX_CONTENT_LENGTH"] = state.args.max_body_bytes
    app.json.ensure_ascii = False
    api_key = state.args.api_key

    def error(status: int, message: str, headers=None):
        resp = jsonify(error_body(status, message))
        resp.status_code = status
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error(e.status, e.message, {"Retry-After": "1"} if e.status in (429, 503) else None)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        msg = {413: f"the request body is larger than this server's limit of {state.args.max_body_bytes} bytes (--max_body_bytes)"}.get(e.code, e.description)
        return error(e.code or 500, msg)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.error("unexpected error:\n%s", traceback.format_exc())
        return error(500, f"internal error: {type(e).__name__}")

    @app.before_request
    def _auth():
        if not api_key:
            return None
        given = request.headers.get("X-API-Key", "")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
        return None

    def body() -> Dict:
        return loads_json(request.get_data(cache=False))

    def wait_done(req: Request, sock) -> Dict:
        for kind, value in req.events_until_done(lambda: _client_gone(sock), state.scheduler.cancel):
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(*value)
        raise ApiError(499, "client closed the connection")

    @app.get("/health")
    def health():
        stats = state.scheduler.stats()
        ready = state.engine is not None
        out = {"status": "ok" if ready else "loading", "model": state.model_name, **stats,
               "max_queue": state.args.max_queue, "max_batch_size": state.args.max_batch_size,
               "max_length": state.args.max_length, "src_length": state.args.src_length}
        if ready:
            out.update(family=state.engine.family.name, tokens_generated=state.engine.tokens_generated, uptime=round(time.time() - state.started, 1))
        return jsonify(out), (200 if ready else 503)

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "paddlellm"}]})

    @app.post("/api/chat")
    def chat():
        chat_req = parse_chat(body(), state.defaults, state.args.max_length)
        req = state.submit(chat_req)
        sock = request.environ.get("werkzeug.socket")
        if not chat_req.stream:
            info = wait_done(req, sock)
            return jsonify({"error_code": 0, "error_msg": "Success", "result": {"response": {"role": "bot", "utterance": info["text"]}}})

        def lines():  # newline-delimited JSON, one object per new piece of text (as PaddleNLP's streaming server)
            try:
                for kind, value in req.events_until_done(lambda: _client_gone(sock), state.scheduler.cancel):
                    if kind == "piece":
                        yield json.dumps({"error_code": 0, "error_msg": "Success", "result": {"response": {"role": "bot", "utterance": value}}}, ensure_ascii=False) + "\n"
                    elif kind == "error":
                        yield json.dumps(error_body(*value), ensure_ascii=False) + "\n"
            finally:
                state.scheduler.cancel(req)  # no-op when finished; frees the slot when the client left

        return Response(lines(), mimetype="application/x-ndjson", headers={"X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    def completions():
        chat_req = parse_openai(body(), state.defaults, state.args.max_length)
        req = state.submit(chat_req)
        sock = request.environ.get("werkzeug.socket")
        cid, created = f"chatcmpl-{req.id}-{secrets.token_hex(6)}", int(time.time())
        head = {"id": cid, "created": created, "model": state.model_name}
        if not chat_req.stream:
            info = wait_done(req, sock)
            return jsonify({**head, "object": "chat.completion",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": info["text"]}, "finish_reason": _finish(info)}],
                            "usage": _usage(info)})

        def chunk(delta: Dict, finish: Optional[str] = None, **extra) -> str:
            obj = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                for kind, value in req.events_until_done(lambda: _client_gone(sock), state.scheduler.cancel):
                    if kind == "piece":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, _finish(value), usage=_usage(value))
                    else:
                        yield f"data: {json.dumps(error_body(*value), ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.scheduler.cancel(req)

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _finish(info: Dict) -> str:
    return "length" if info["finish_reason"] == "length" else "stop"


def _usage(info: Dict) -> Dict[str, int]:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}


# =========================================================================== entry point
def check_args(args: ServeArgument) -> None:
    if not (args.model_name_or_path or args.lora_path or args.prefix_path):
        raise UserError("--model_name_or_path is required (a model folder or name, or a LoRA / prefix output folder)")
    for name in ("port", "flask_port"):
        if not 0 < getattr(args, name) < 65536:
            raise UserError(f"--{name} must be a port number (1-65535), got {getattr(args, name)}")
    if args.ui and args.port == args.flask_port:
        raise UserError(f"--port (UI) and --flask_port (API) must differ, both are {args.port}")
    for name in ("max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("src_length", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.top_k < 0 or not 0 < args.top_p <= 1 or args.temperature < 0 or args.repetition_penalty <= 0:
        raise UserError("sampling defaults out of range: need --top_k >= 0, 0 < --top_p <= 1, --temperature >= 0, --repetition_penalty > 0")
    if args.batch_wait_ms < 0 or args.debug_step_delay < 0:
        raise UserError("--batch_wait_ms and --debug_step_delay must be >= 0")


def _bind_http(app, host: str, port: int):
    """A threaded werkzeug server on host:port; our own bind, so a busy port is a one-line error (werkzeug
    would print two lines and exit)."""
    from werkzeug.serving import make_server

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            return make_server(host, port, app, threaded=True, fd=sock.fileno())  # werkzeug dups the socket
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} (--flask_port): {e.strerror or e}") from None


def main(argv=None) -> int:
    (args,) = parse_args([ServeArgument], argv, prog="paddlellm serve", description=__doc__.split("\n\nHow it works")[0])
    args.api_key = args.api_key or os.environ.get("PADDLELLM_API_KEY") or None
    rank, world = int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    try:
        check_args(args)
        from .inference import read_meta

        adapter = args.lora_path or args.prefix_path or args.model_name_or_path
        meta = read_meta(adapter) if adapter and os.path.isdir(adapter) else {}
        args.src_length = args.src_length or meta.get("src_length") or 1024
        args.max_length = args.max_length or meta.get("tgt_length") or 512
        args.dtype = args.dtype or meta.get("dtype") or "float32"
        model_name = args.model_name or os.path.basename(os.path.normpath(adapter))
    except UserError as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("werkzeug", "httpx"):  # a line per request (httpx: gradio's start-up checks)
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .runtime import setup_runtime

    setup_runtime()
    state = ServerState(args, model_name)
    stopping = threading.Event()
    servers = []
    try:
        if rank == 0:  # API and UI come up first (answering 503 while the model loads), so a busy port fails fast
            http = _bind_http(create_app(state), args.host, args.flask_port)
            threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
            servers.append(http.shutdown)
            if args.ui:
                from .serve_ui import launch_ui

                servers.append(launch_ui(state, args))
        engine = load_engine(args, world)
    except UserError as e:
        for close in servers:
            close()
        fail(str(e))

    if rank != 0:
        engine.follow()
        return 0
    engine.scheduler = state.scheduler
    state.engine = engine
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (stopping.set(), state.scheduler.wake()))
    where = f"API http://{args.host}:{args.flask_port} (/api/chat, /v1/chat/completions, /health)"
    if args.ui:
        where += f", chat UI http://{args.host}:{args.port}"
    print(f"serving {model_name} ({engine.family.name}, {world} process{'es' if world > 1 else ''}): {where}", flush=True)
    try:
        engine.serve(state.scheduler, stopping)
    finally:
        for close in servers:
            try:
                close()
            except Exception:
                pass
    return 0


def load_engine(args: ServeArgument, world: int) -> Engine:
    import paddle

    device = args.device
    if device == "auto":
        device = "gpu" if paddle.device.is_compiled_with_cuda() else "cpu"
    try:
        paddle.set_device(device)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--device {device}: {e}") from None
    channel = None
    if world > 1:
        paddle.distributed.init_parallel_env()
        channel = Channel()
    from .inference import load_for_inference

    try:
        model, tokenizer, family, _ = load_for_inference(args.model_name_or_path, args.lora_path, args.prefix_path, args.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model: {type(e).__name__}: {e}") from None
    return Engine(model, tokenizer, family, args.src_length, channel, args.debug_step_delay)


if __name__ == "__main__":
    sys.exit(main())
