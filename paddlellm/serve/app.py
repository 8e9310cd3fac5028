"""HTTP API (PaddleNLP-style and OpenAI-compatible, streaming) and a Gradio chat UI for one model.

    python flask_server.py --model_name_or_path DIR [--flask_port 8010] [--port 8011] [--api_key KEY] ...
    python -m paddle.distributed.launch --nproc_per_node N flask_server.py ...   (rank 0 serves HTTP)

Endpoints (on --flask_port): POST /api/chat (PaddleNLP), POST /v1/chat/completions and POST /v1/completions
(OpenAI, `stream` gives server-sent events; log-probabilities, echo, n choices), GET /tokenizer_info,
POST /tokenize, POST /detokenize (as vLLM's server), GET /v1/models, GET /health. The Gradio chat UI
listens on --port.

How it works: the main thread owns the model (paddle's generate is not thread-safe). HTTP handler
threads validate a request, build its prompt with the chat format the model was fine-tuned with
(family.generation_prompt, as predict_generation.py) and put it on a bounded queue (full -> 429).
The model thread takes the oldest request plus up to max_batch_size-1 waiting requests with the same
sampling parameters and generates them as one left-padded batch with paddlenlp's generate() (a call
asking for n choices or several prompts queues one request per choice; they batch together).
Prompt log-probabilities come from one forward pass over the batch's prompts before generation. A
streamer hands every new token to its request, which sends the text that is new since its last piece
(multi-byte characters arrive whole; the pieces join to exactly the reply). A logits processor ends
a row early (forces its stop token) when its own max_length is reached, its client went away or a stop
string appeared. Under paddle.distributed.launch rank 0 broadcasts every batch (prompt ids and
parameters) to the other ranks, which run the same generation in lock step.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..arguments import UserError, check_sampling, fail, parse_args, require_at_least
from ..chat_template import check_choice as check_chat_template
from . import responses
from .engine import Channel, Engine
from .scheduler import Request, RequestGroup, Scheduler
from .requests import ApiError, ChatRequest, Sampling, loads_json, parse_chat, parse_completions, parse_openai

log = logging.getLogger("paddlellm.serve")


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
    chat_template: Optional[str] = field(default=None, metadata={"help": "Chat template: a Jinja file, or none for the family's own format. Default: the model folder's own (chat_template.jinja or tokenizer_config.json chat_template) if it has one, else the family's format."})
    max_batch_size: int = field(default=8, metadata={"help": "Most requests generated together in one batch (same sampling parameters)."})
    max_queue: int = field(default=64, metadata={"help": "Most requests waiting for the model; more are answered 429."})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "How long the model thread waits for more compatible requests before starting a batch that is not full."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body accepted (larger -> 413)."})
    max_logprobs: int = field(default=20, metadata={"help": "Most alternatives a request may ask for per token (logprobs / top_logprobs; more -> 400)."})
    quant_runtime: str = field(default="float32", metadata={"help": "Quantized folders (paddlellm quant): float32 dequantizes the weights when loading; int8 keeps the integer weights resident and dequantizes each layer during the forward (less memory).", "choices": ["float32", "int8"]})
    mode: Optional[str] = field(default=None, metadata={"help": "dynamic (the default), or static: serve a folder written by export_model.py with paddle.inference (chosen by itself for such a folder).", "choices": ["dynamic", "static"]})
    debug_step_delay: float = field(default=0.0, metadata={"help": "TESTING ONLY: sleep this many seconds per generated token (makes queueing deterministic in tests)."})



# =========================================================================== HTTP
def error_body(status: int, message: str, param: Optional[str] = None) -> Dict:
    """One error shape for both APIs: PaddleNLP's error_code/error_msg and OpenAI's error object
    ({"message", "type", "param", "code"})."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error_code": status, "error_msg": message, "error": {"message": message, "type": kind, "param": param, "code": status}}


class ServerState:
    def __init__(self, args: ServeArgument, model_name: str):
        self.args = args
        self.model_name = model_name
        self.engine: Optional[Engine] = None  # None while the model loads
        self.scheduler = Scheduler(args.max_queue, args.max_batch_size, args.batch_wait_ms / 1000.0)
        self.defaults = Sampling(args.top_k, args.top_p, args.temperature, args.repetition_penalty)
        self.started = time.time()

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry shortly")
        return self.engine

    def make_request(self, chat: ChatRequest) -> Request:
        try:
            return self.ready_engine().make_request(chat)
        except ApiError:
            raise
        except Exception as e:  # e.g. text the tokenizer cannot encode (lone surrogates)
            raise ApiError(400, f"cannot encode the conversation: {type(e).__name__}: {e}") from None

    def submit(self, chat: ChatRequest) -> Request:
        req = self.make_request(chat)
        self.scheduler.submit(req)
        return req

    def submit_group(self, chats: List[ChatRequest]) -> RequestGroup:
        """n requests per prompt, queued all or none. They share one batch key, so a seeded call is batched
        alone but as a whole (its n choices differ and the call is reproducible)."""
        reqs = [self.make_request(c) for c in chats for _ in range(c.n)]
        for r in reqs[1:]:
            r.key = reqs[0].key
        self.scheduler.submit_all(reqs)
        return RequestGroup(reqs)


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

    def error(status: int, message: str, headers=None, param=None):
        resp = jsonify(error_body(status, message, param))
        resp.status_code = status
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error(e.status, e.message, {"Retry-After": "1"} if e.status in (429, 503) else None, e.param)

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

    def collect(group: RequestGroup, sock) -> List[Dict]:
        """Wait for every request of a call; the infos of the finished requests, in order."""
        infos: List[Optional[Dict]] = [None] * len(group.reqs)
        try:
            for i, kind, value in group.events_until_done(lambda: _client_gone(sock), state.scheduler.cancel):
                if kind == "done":
                    infos[i] = value
                elif kind == "error":
                    raise ApiError(*value)
        finally:
            group.cancel(state.scheduler.cancel)  # no-op for finished requests
        if any(i is None for i in infos):
            raise ApiError(499, "client closed the connection")
        return infos

    def sse(obj: Dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(gen):
        return Response(gen, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_events(group, sock, prompts: List[int], chunk, opening=(), logprobs_of=None, prompt_chunk=None):
        """The server-sent events of a streamed call, the same for /v1/chat/completions and /v1/completions,
        which differ only in how a chunk is made. `chunk(i, text, finish=None, logprobs=None, **extra)`
        makes choice i's chunk (text None: the closing chunk, which carries no text); `opening` the
        chunks sent before any token; `logprobs_of(i, records)` the logprobs of tokens whose text goes out
        (None: not asked for); `prompt_chunk(i, rows)` the chunk of the prompt's logprobs (echo)."""
        reqs = group.reqs
        infos: Dict[int, Dict] = {}
        pending: List[List] = [[] for _ in reqs]  # logprobs of tokens whose text has not gone out yet

        def take(i: int):
            if logprobs_of is None:
                return None
            recs, pending[i] = pending[i], []
            return logprobs_of(i, recs)

        try:
            yield from opening
            for i, kind, value in group.events_until_done(lambda: _client_gone(sock), state.scheduler.cancel):
                if kind == "prompt_logprobs" and prompt_chunk is not None:
                    yield prompt_chunk(i, value)
                elif kind == "logprobs":
                    pending[i] += value
                elif kind == "piece":
                    yield chunk(i, value, logprobs=take(i))
                elif kind == "done":
                    infos[i] = value
                    last = {"usage": responses.usage(list(infos.values()), prompts)} if len(infos) == len(reqs) else {}
                    yield chunk(i, None, responses.finish_reason(value), logprobs=take(i), **last)
                else:
                    yield sse(error_body(*value))
            yield "data: [DONE]\n\n"
        finally:
            group.cancel(state.scheduler.cancel)

    @app.post("/v1/chat/completions")
    def chat_completions():
        chat_req = parse_openai(body(), state.defaults, state.args.max_length, state.args.max_logprobs)
        group = state.submit_group([chat_req])
        reqs, sock = group.reqs, request.environ.get("werkzeug.socket")
        head = {"id": f"chatcmpl-{reqs[0].id}-{secrets.token_hex(6)}", "created": int(time.time()), "model": state.model_name}
        prompts = [len(reqs[0].prompt)]
        if not chat_req.stream:
            infos = collect(group, sock)
            choices = [{"index": i, "message": {"role": "assistant", "content": info["text"]},
                        "logprobs": responses.chat_logprobs(state.engine, r, info), "finish_reason": responses.finish_reason(info)}
                       for i, (r, info) in enumerate(zip(reqs, infos))]
            return jsonify({**head, "object": "chat.completion", "choices": choices, "usage": responses.usage(infos, prompts)})

        def delta_chunk(i: int, delta: Dict, finish: Optional[str] = None, logprobs=None, **extra) -> str:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

        def chunk(i: int, text: Optional[str], finish: Optional[str] = None, logprobs=None, **extra) -> str:
            return delta_chunk(i, {} if text is None else {"content": text}, finish, logprobs, **extra)

        lps = [responses.Logprobs(state.engine, r.prompt) for r in reqs]
        opening = (delta_chunk(i, {"role": "assistant", "content": ""}) for i in range(len(reqs)))
        logprobs_of = None if chat_req.logprobs is None else (lambda i, recs: lps[i].chat(recs))
        return stream_response(stream_events(group, sock, prompts, chunk, opening, logprobs_of))

    @app.post("/v1/completions")
    def completions():
        chats = parse_completions(body(), state.defaults, state.args.max_length, state.args.max_logprobs)
        group = state.submit_group(chats)
        reqs, sock = group.reqs, request.environ.get("werkzeug.socket")
        engine = state.engine
        head = {"id": f"cmpl-{reqs[0].id}-{secrets.token_hex(6)}", "created": int(time.time()), "model": state.model_name}
        prompts = [len(r.prompt) for r in reqs[:: chats[0].n]]
        echoes = [(c.prompt_text if c.prompt_text is not None else engine.detokenize(c.prompt_ids)) if c.echo else "" for c in chats for _ in range(c.n)]
        if not chats[0].stream:
            infos = collect(group, sock)
            choices = [{"index": i, "text": echo + info["text"], "logprobs": responses.completion_logprobs(engine, r, info),
                        "finish_reason": responses.finish_reason(info)} for i, (r, info, echo) in enumerate(zip(reqs, infos, echoes))]
            return jsonify({**head, "object": "text_completion", "choices": choices, "usage": responses.usage(infos, prompts)})

        def chunk(i: int, text: Optional[str], finish: Optional[str] = None, logprobs=None, **extra) -> str:
            choice = {"index": i, "text": "" if text is None else text, "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "object": "text_completion", "choices": [choice], **extra})

        want = chats[0].logprobs is not None
        lps = [responses.Logprobs(engine, [] if r.prompt_logprobs is not None else r.prompt) for r in reqs]
        # with logprobs, the echo goes out with the prompt's logprobs (a prompt_logprobs event)
        opening = (chunk(i, echo) for i, echo in enumerate(echoes) if echo and not want)
        logprobs_of = (lambda i, recs: lps[i].completion(responses.generated_rows(recs))) if want else None

        def prompt_chunk(i: int, rows: List) -> str:
            return chunk(i, echoes[i], logprobs=lps[i].completion(responses.prompt_rows(reqs[i].prompt, rows)))

        return stream_response(stream_events(group, sock, prompts, chunk, opening, logprobs_of, prompt_chunk))

    @app.get("/tokenizer_info")
    def tokenizer_info():
        engine = state.ready_engine()
        tok = engine.tokenizer
        return jsonify({"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                        "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                        "chat_template": getattr(tok, "chat_template", None) if isinstance(getattr(tok, "chat_template", None), str) else None,
                        "model_max_length": engine.max_positions, "vocab_size": engine.vocab_size})

    @app.post("/tokenize")
    def tokenize():
        data, engine = body(), state.ready_engine()
        text, special = data.get("prompt"), data.get("add_special_tokens", True)
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be a string (the text to tokenize)", "prompt")
        if not isinstance(special, bool):
            raise ApiError(400, "add_special_tokens must be true or false", "add_special_tokens")
        ids = engine.encode(text, add_special_tokens=special)
        return jsonify({"tokens": ids, "count": len(ids), "max_model_len": engine.max_positions})

    @app.post("/detokenize")
    def detokenize():
        data, engine = body(), state.ready_engine()
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens must be a list of token ids", "tokens")
        return jsonify({"prompt": engine.detokenize(ids)})

    return app


# =========================================================================== entry point
def check_args(args: ServeArgument) -> None:
    if not (args.model_name_or_path or args.lora_path or args.prefix_path):
        raise UserError("--model_name_or_path is required (a model folder or name, or a LoRA / prefix output folder)")
    for name in ("port", "flask_port"):
        if not 0 < getattr(args, name) < 65536:
            raise UserError(f"--{name} must be a port number (1-65535), got {getattr(args, name)}")
    if args.ui and args.port == args.flask_port:
        raise UserError(f"--port (UI) and --flask_port (API) must differ, both are {args.port}")
    require_at_least({name: getattr(args, name) for name in ("max_batch_size", "max_queue", "max_body_bytes", "src_length", "max_length")})
    if args.max_logprobs < 0:
        raise UserError(f"--max_logprobs must be >= 0, got {args.max_logprobs}")
    check_sampling(args.top_k, args.top_p, args.temperature, args.repetition_penalty)  # the defaults of every request
    check_chat_template(args.chat_template)
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
        from ..files import read_meta

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

    from ..runtime import setup_runtime

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
                from .ui import launch_ui

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
    where = f"API http://{args.host}:{args.flask_port} (/api/chat, /v1/chat/completions, /v1/completions, /tokenize, /health)"
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
    from ..loading import load_for_inference

    try:
        model, tokenizer, family, _ = load_for_inference(args.model_name_or_path, args.lora_path, args.prefix_path, args.dtype,
                                                         mode=args.mode, quant_runtime=args.quant_runtime, chat_template=args.chat_template)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model: {type(e).__name__}: {e}") from None
    return Engine(model, tokenizer, family, args.src_length, channel, args.debug_step_delay)


if __name__ == "__main__":
    sys.exit(main())
