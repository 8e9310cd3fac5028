"""The model side of `paddlellm serve`: text streaming, requests and the queue, the distributed hand-off
between ranks, and batched generation on the model thread (see paddlellm.serve's docstring for how it works)."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import queue
import secrets
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .requests import ApiError, ChatRequest, Sampling

log = logging.getLogger("paddlellm.serve")
STOP_OP, NOOP_OP, GENERATE_OP = "stop", "noop", "generate"


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
        from ..generation import decode

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

        from .. import generation

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
        streams = generation.uses_own_loop(self.model, self.family, strategy == "sample") or _accepts_streamer(self.model, strategy)
        kwargs["logits_processors"] = _processor_list([_RowControl(self, origin_len, max_new, sink, feed_sink=not streams)])
        if streams and sink is not None:
            kwargs["streamer"] = sink
        with paddle.no_grad():
            out = generation.generate_with(self.model, self.family, inputs, kwargs)  # the decode loop where it is exact
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
