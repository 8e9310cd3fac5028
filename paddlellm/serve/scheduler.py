"""The HTTP side of `paddlellm serve`'s model thread: text streaming, requests, request groups (n choices)
and the bounded queue the model thread takes its batches from (see paddlellm.serve's docstring)."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .requests import ApiError, ChatRequest

log = logging.getLogger("paddlellm.serve")


# =========================================================================== text streaming
class TextStream:
    """Turns a growing reply (token ids) into text pieces whose concatenation is the reply.

    The reply is `decode(ids)` (generation.decode: special tokens skipped, stripped), cut at the first
    stop string. While it grows, only a window of the last tokens is decoded at each step (the way
    text-generation-inference does it, so a long reply costs O(1) per step, not O(length)): the text
    of ids[prefix_offset:] minus that of ids[prefix_offset:read_offset] is new, unless it ends in U+FFFD
    (an incomplete multi-byte character). Held back as well: leading/trailing whitespace (a chat reply is
    stripped; strip=False keeps a raw completion as it is) and any tail that may be the start of a stop
    string. The last update decodes the whole reply once, and only its remainder goes out.
    `context`: the last prompt tokens, decoded before the reply so that its first token keeps its
    leading space (a raw completion continues its prompt's text).
    """

    def __init__(self, decode: Callable[[List[int]], str], decode_raw: Optional[Callable[[List[int]], str]] = None,
                 stop: Sequence[str] = (), strip: bool = True, context: Sequence[int] = ()):
        self.decode = decode if strip else (decode_raw or decode)
        self.decode_raw = decode_raw or decode  # without strip(): windows must keep their spaces
        self.strip = strip
        self.stop = [s for s in stop if s]
        self.context = list(context)
        self.prefix_offset, self.read_offset = 0, len(self.context)
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
            if self.context:
                head, whole = self.decode(self.context), self.decode(self.context + list(ids))
                text = whole[len(head):] if whole.startswith(head) else text
        else:
            ids = self.context + list(ids)
            prefix = self.decode_raw(ids[self.prefix_offset:self.read_offset])
            window = self.decode_raw(ids[self.prefix_offset:])
            if len(window) > len(prefix) and not window.endswith("\ufffd") and window.startswith(prefix):
                self.raw += window[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            text = self.raw.strip() if self.strip else self.raw
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
        self.text = TextStream(decode, decode_raw, chat.stop, strip=not chat.raw, context=prompt[-4:] if chat.raw else ())
        self.created = time.time()
        self.logprobs = chat.logprobs  # alternatives per generated token (None: no log-probabilities)
        self.prompt_logprobs = chat.logprobs if chat.echo and chat.logprobs is not None else None  # the same for the prompt
        self.logprobs_sent = 0  # streaming: generated tokens whose logprobs went out

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


class _Tagged:
    """Stands in for a Request's event queue inside a RequestGroup: events go to the group's queue, tagged with the row."""

    def __init__(self, shared: "queue.SimpleQueue", index: int):
        self.shared, self.index = shared, index

    def put(self, event) -> None:
        self.shared.put((self.index,) + tuple(event))


class RequestGroup:
    """The requests of one HTTP call (n choices of each prompt), answered together: events arrive tagged
    with the choice index, in the order the model produced them."""

    def __init__(self, reqs: List[Request]):
        self.reqs = reqs
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()
        for i, r in enumerate(reqs):
            r.events = _Tagged(self.events, i)

    def events_until_done(self, client_gone: Callable[[], bool], cancel: Callable[[Request], None], poll: float = 0.25) -> Iterator[Tuple[int, str, Any]]:
        """Yield (index, kind, value) until every request is done or failed; cancel them all if the client goes away."""
        left = set(range(len(self.reqs)))
        while left:
            try:
                ev = self.events.get(timeout=poll)
            except queue.Empty:
                if client_gone():
                    self.cancel(cancel)
                    return
                continue
            yield ev
            if ev[1] in ("done", "error"):
                left.discard(ev[0])

    def cancel(self, cancel: Callable[[Request], None]) -> None:
        for r in self.reqs:
            cancel(r)


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
        self.submit_all([req])

    def submit_all(self, reqs: List[Request]) -> None:
        """Queue every request or none (429 when they do not all fit)."""
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down")
            if len(self.waiting) + len(reqs) > self.max_queue:
                if len(reqs) > self.max_queue:
                    raise ApiError(400, f"this request asks for {len(reqs)} completions (prompts x n); this server queues at most {self.max_queue} (--max_queue)", "n")
                raise ApiError(429, f"too many requests: {len(self.waiting)} are waiting (--max_queue {self.max_queue}); retry later")
            self.waiting.extend(reqs)
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
