"""The model side of `paddlellm serve`: the distributed hand-off between ranks, and batched generation on
the model thread, with log-probabilities (see paddlellm.serve's docstring for how it works)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import secrets
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .requests import ApiError, ChatRequest, Sampling
from .scheduler import Request, Scheduler

log = logging.getLogger("paddlellm.serve")
STOP_OP, NOOP_OP, GENERATE_OP = "stop", "noop", "generate"


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
        self.want_logprobs = any(r.logprobs is not None for r in reqs)
        self.pending: Dict[int, Any] = {}  # step -> [batch, vocab] log-softmax of the logits that step chose from
        self.logprobs: List[List[Tuple[int, float, List[Tuple[int, float]]]]] = [[] for _ in reqs]  # (token, logprob, top)
        self.prompt_logprobs: List[Optional[List]] = [None] * len(reqs)

    def feed(self, cols) -> None:
        """Take in new generated steps: cols is [batch, k] token ids."""
        stops = self.engine.stop_ids
        for b, req in enumerate(self.reqs):
            if self.done[b]:
                continue
            natural_stop = False
            for j, t in enumerate(cols[b]):
                t = int(t)
                if t in stops:
                    natural_stop = True
                    break
                self.tokens[b].append(t)
                if req.logprobs is not None:
                    self.logprobs[b].append(self._logprob(b, self.seen + j, t, req.logprobs))
                if len(self.tokens[b]) >= req.max_new_tokens:
                    break
            if req.chat.stream or req.text.stop:  # otherwise the reply is decoded once, when it ends
                piece = self.engine.decode_piece(req, self.tokens[b])
                if piece and req.chat.stream:
                    self._send_logprobs(b)
                    req.events.put(("piece", piece))
            if req.text.stopped or natural_stop:
                self.finish_row(b, "stop")
            elif len(self.tokens[b]) >= req.max_new_tokens:
                self.finish_row(b, "length")
            elif req.cancelled.is_set():
                self.finish_row(b, "cancelled")
        self.seen += len(cols[0]) if len(cols) else 0
        for step in [k for k in self.pending if k < self.seen]:
            del self.pending[step]

    def set_prompt_logprobs(self, b: int, rows: List) -> None:
        self.prompt_logprobs[b] = rows
        if self.reqs[b].chat.stream:  # a stream sends the echoed prompt with them
            self.reqs[b].events.put(("prompt_logprobs", rows))

    def _send_logprobs(self, b: int) -> None:
        """Streaming: the logprobs of the tokens generated since the last piece go out before the next piece."""
        req = self.reqs[b]
        if req.logprobs is not None:
            sent = req.logprobs_sent
            if len(self.logprobs[b]) > sent:
                req.events.put(("logprobs", self.logprobs[b][sent:]))
                req.logprobs_sent = len(self.logprobs[b])

    def _logprob(self, b: int, step: int, token: int, k: int) -> Tuple[int, float, List[Tuple[int, float]]]:
        lsm = self.pending[step][b]
        return token, float(lsm[token]), top_k(lsm, k)

    def finish_row(self, b: int, reason: str) -> None:
        req = self.reqs[b]
        self.done[b] = True
        piece = self.engine.decode_piece(req, self.tokens[b], final=True)
        if req.chat.stream:
            self._send_logprobs(b)
        if piece and req.chat.stream:
            req.events.put(("piece", piece))
        info = {"text": req.text.sent if req.chat.stream else req.text.text, "finish_reason": reason,
                "prompt_tokens": len(req.prompt), "completion_tokens": len(self.tokens[b]), "tokens": self.tokens[b],
                "logprobs": self.logprobs[b] if req.logprobs is not None else None, "prompt_logprobs": self.prompt_logprobs[b]}
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


def top_k(lsm, k: int) -> List[Tuple[int, float]]:
    """The k (token, logprob) pairs of a log-softmax vector with the highest logprobs, best first."""
    import numpy as np

    if k <= 0:
        return []
    idx = np.argpartition(-lsm, k - 1)[:k] if k < len(lsm) else np.arange(len(lsm))
    idx = idx[np.argsort(-lsm[idx], kind="stable")]
    return [(int(i), float(lsm[i])) for i in idx]


class _RowControl:
    """A logits processor that forces the stop token for rows that must end: a row that reached its own
    max_new_tokens (rows of one batch may ask for different lengths) or, on rank 0's say, a client that
    went away / a stop string. Also feeds the sink when the decode path has no streamer support, and keeps
    the log-softmax of the logits when a row wants log-probabilities. It is the first processor of the list
    (Engine.generate), so it sees the model's raw logits: no repetition penalty, temperature or top-k/top-p yet."""

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
        if self.sink is not None and self.sink.want_logprobs:
            import paddle.nn.functional as F

            self.sink.pending[generated] = F.log_softmax(logits.astype("float32"), axis=-1).numpy()
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
        self.stop_ids = family.stop_token_ids(tokenizer)  # any of them ends a reply (generation_config eos lists)
        self.stop_id = self.stop_ids[0]  # the one a row forced to end is given
        _cache_special_ids(tokenizer)
        self.lock = threading.Lock()  # the tokenizer is shared by HTTP threads and the model thread
        self.scheduler: Optional[Scheduler] = None
        config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # Ids a prompt may hold: inside both the tokenizer's and the model's vocabulary.
        self.vocab_size = min(v for v in (len(tokenizer), getattr(config, "vocab_size", None)) if v)
        self._inputs_take_length = "max_new_tokens" in inspect.signature(family.generation_inputs).parameters
        self.tokens_generated = 0  # reply tokens handed out (rank 0)
        self.last_steps = 0  # decode steps of the last batch

    # ------------------------------------------------------------------ called from HTTP / UI threads
    def make_request(self, chat: ChatRequest) -> Request:
        """A Request for the scheduler: the prompt ids (chat format, or a raw completion prompt), checked."""
        from ..generation import decode

        max_new = chat.max_new_tokens
        if chat.raw:
            prompt = self.raw_prompt(chat)
            if self.max_positions and len(prompt) + max_new > self.max_positions:
                raise ApiError(400, f"this model's maximum context length is {self.max_positions} tokens; the prompt has {len(prompt)} "
                                    f"and max_tokens asks for {max_new} more", "max_tokens")
            if chat.echo and chat.logprobs is not None and self.family.prefix_lm:
                raise ApiError(400, f"prompt log-probabilities (echo with logprobs) are not defined for the {self.family.name} family: "
                                    "its prompt attends bidirectionally", "echo")
        else:
            with self.lock:
                prompt = self.family.generation_prompt(self.tokenizer, chat.user_turns, chat.bot_turns, self.src_length,
                                                       system=chat.system)
            if self.max_positions:  # never generate past the position table
                max_new = max(1, min(max_new, self.max_positions - len(prompt)))

        def dec(ids: List[int]) -> str:
            with self.lock:
                return decode(self.tokenizer, ids)

        def dec_raw(ids: List[int]) -> str:  # generation.decode without its strip()
            with self.lock:
                return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

        return Request(chat, prompt, max_new, dec, dec_raw)

    def raw_prompt(self, chat: ChatRequest) -> List[int]:
        """The ids of a /v1/completions prompt: given ids (checked against the vocabulary) or the text encoded
        with the tokenizer's special tokens (as vLLM does), at most --src_length of them."""
        if chat.prompt_ids is not None:
            bad = [t for t in chat.prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt")
            prompt = list(chat.prompt_ids)
        else:
            prompt = self.encode(chat.prompt_text, add_special_tokens=True)
        if not prompt:
            raise ApiError(400, "the prompt is empty (no tokens)", "prompt")
        if len(prompt) > self.src_length:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, above this server's limit of {self.src_length} (--src_length)", "prompt")
        return prompt

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        try:
            with self.lock:
                return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as e:  # e.g. lone surrogates
            raise ApiError(400, f"cannot encode the text: {type(e).__name__}: {e}", "prompt") from None

    def detokenize(self, ids: List[int]) -> str:
        """The text of token ids, special tokens included (as vLLM's /detokenize)."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", "tokens")
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def token_texts(self, ids: List[int], alternatives: Sequence[Sequence[int]] = (), context: Sequence[int] = ()) -> Tuple[List[str], List[List[str]]]:
        """The text each token of `ids` adds after the tokens before it (so the texts join to the decoded
        sequence; a sentencepiece token keeps its leading space; a token holding part of a multi-byte character
        is shown by its name), and the same for alternatives[i], the candidates at position i. `context`:
        tokens before ids[0]. Special tokens are shown."""
        window = 4  # earlier tokens decoded with a token: enough for multi-token characters and spaces
        seq = list(context) + list(ids)
        off = len(context)
        texts, alts = [], []
        with self.lock:
            dec = lambda t: self.tokenizer.decode(t, skip_special_tokens=False) if t else ""  # noqa: E731
            for i, t in enumerate(ids):
                ctx = seq[max(0, off + i - window): off + i]
                before = dec(ctx)

                def piece(tok: int) -> str:
                    after = dec(ctx + [tok])
                    text = after[len(before):] if after.startswith(before) else dec([tok])
                    # part of a multi-byte character: the token's own name (e.g. "<0xE6>"), one per id
                    return self.tokenizer.convert_ids_to_tokens(tok) if "\ufffd" in text else text

                texts.append(piece(t))
                alts.append([piece(a) for a in alternatives[i]] if i < len(alternatives) else [])
        return texts, alts

    def score_prompts(self, prompts: List[List[int]], k: int) -> List[List[Tuple[float, List[Tuple[int, float]]]]]:
        """Log-probabilities of every prompt token after the first: one forward pass over the prompts (the
        training collate, right-padded, causal), log-softmax of the model's logits; for each position
        (logprob of the token, its k best alternatives)."""
        import paddle
        import paddle.nn.functional as F

        from ..cpu_kernels import dense_views
        from ..families.base import logits_of

        batch = self.family.build_batch([[self.family.make_example(list(p), list(p), 0, False)] for p in prompts], self.tokenizer.pad_token_id)
        batch.pop("labels", None)
        with paddle.no_grad(), dense_views():
            logits = logits_of(self.model(**{key: paddle.to_tensor(v) for key, v in batch.items()}))
            lsm = F.log_softmax(logits.astype("float32")[:, :-1], axis=-1)  # [B, S-1, V]: position i predicts token i+1
            nxt = paddle.to_tensor(batch["input_ids"][:, 1:]).unsqueeze(-1)
            chosen = paddle.take_along_axis(lsm, nxt, axis=-1).squeeze(-1).numpy()
            if k > 0:
                top_v, top_i = paddle.topk(lsm, k=min(k, lsm.shape[-1]), axis=-1)
                top_v, top_i = top_v.numpy(), top_i.numpy()
        out = []
        for b, p in enumerate(prompts):
            out.append([(float(chosen[b, i]), [(int(t), float(v)) for t, v in zip(top_i[b, i], top_v[b, i])] if k > 0 else [])
                        for i in range(len(p) - 1)])
        return out

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
               "sampling": dataclasses.asdict(s), "seed": s.seed if s.seed is not None else secrets.randbelow(2**31),
               "prompt_logprobs": [r.prompt_logprobs for r in reqs]}
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
        # Prompt log-probabilities first (every rank runs the same forward: collectives stay in step).
        wanted = job.get("prompt_logprobs") or [None] * len(prompts)
        rows = [b for b, k in enumerate(wanted) if k is not None]
        if rows:
            scores = self.score_prompts([prompts[b] for b in rows], max(wanted[b] for b in rows))
            if sink is not None:
                for b, row in zip(rows, scores):
                    sink.set_prompt_logprobs(b, [(lp, top[: wanted[b]]) for lp, top in row])
        if sink is not None:
            for b, m in enumerate(max_new):
                if m == 0:  # echo only: nothing to generate
                    sink.finish_row(b, "length")
        if max(max_new) == 0:
            self.last_steps = 0
            return
        s = Sampling(**job["sampling"])
        extra = {"max_new_tokens": max(max_new)} if self._inputs_take_length else {}
        inputs = {k: paddle.to_tensor(v) for k, v in self.family.generation_inputs(self.tokenizer, prompts, **extra).items()}
        origin_len = inputs["input_ids"].shape[1]
        # max_length too: paddlenlp replaces a max_new_tokens equal to its default (20) by the model's max_length.
        kwargs: Dict[str, Any] = dict(max_new_tokens=max(max_new), max_length=max(max_new), eos_token_id=self.stop_ids if len(self.stop_ids) > 1 else self.stop_id,
                                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True, repetition_penalty=s.repetition_penalty)
        if s.greedy:
            kwargs["decode_strategy"] = "greedy_search"
            strategy = "greedy_search"
        else:
            paddle.seed(job["seed"])
            kwargs.update(decode_strategy="sampling", top_k=max(s.top_k, 0), top_p=s.top_p, temperature=s.temperature)
            strategy = "sample"
        streams = generation.uses_own_loop(self.model, self.family, strategy == "sample") or _accepts_streamer(self.model, strategy)
        processors = [_RowControl(self, origin_len, max_new, sink, feed_sink=not streams)]
        if s.repetition_penalty != 1.0:  # given here so it runs after _RowControl, which must see the raw logits
            from paddlenlp.generation.logits_process import RepetitionPenaltyLogitsProcessor

            processors.append(RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
        kwargs["logits_processors"] = _processor_list(processors)
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
