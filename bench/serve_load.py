"""Load test of `paddlellm serve`: N concurrent clients for a fixed time against /v1/chat/completions.

Prints and saves requests/s, generated tokens/s, latency p50/p95 (and time to first token when
streaming), the error count by kind, and the server's batching figures (/health).

    python bench/serve_load.py                                   # builds a random LLaMA, starts a server per --batch_sizes entry
    python bench/serve_load.py --url http://127.0.0.1:8010 [--api_key KEY]    # an already running server
    python bench/serve_load.py --clients 8 --duration 20 --max_tokens 32 --stream true --batch_sizes 1,8 \
        --output bench/results/serve_load.json

Every client sends a different greedy request (temperature 0), so requests are batch-compatible; the
server is started with --max_batch_size from --batch_sizes, to show what batching buys.
"""
from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paddlellm.arguments import fail, parse_args  # noqa: E402  (stdlib only)


@dataclass
class LoadArgument:
    url: Optional[str] = field(default=None, metadata={"help": "Base URL of a running server (default: start one per --batch_sizes entry)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "API key of the server, if it needs one."})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model for the servers this script starts (default: build a random LLaMA, see --hidden_size)."})
    hidden_size: int = field(default=512, metadata={"help": "Hidden size of the random LLaMA built when no model is given."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Layers of the random LLaMA built when no model is given."})
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8], metadata={"help": "--max_batch_size of each server started (one run each)."})
    clients: int = field(default=8, metadata={"help": "Concurrent clients."})
    duration: float = field(default=20.0, metadata={"help": "Seconds during which clients start new requests."})
    max_tokens: int = field(default=32, metadata={"help": "max_tokens of every request."})
    stream: bool = field(default=True, metadata={"help": "Stream replies (server-sent events) and measure time to first token."})
    output: str = field(default=os.path.join(REPO, "bench", "results", "serve_load.json"), metadata={"help": "Where to save the figures (JSON)."})


# --------------------------------------------------------------------------- one client
def one_request(url: str, headers: Dict[str, str], body: Dict, timeout: float = 300.0) -> Dict:
    """Send one chat completion; returns status, latency, time to first token and completion tokens."""
    u = urllib.parse.urlparse(url)
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0}
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            resp.read()
        elif body.get("stream"):
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["status"] = chunk["error"]["code"]
                    break
                if chunk["choices"][0]["delta"].get("content") and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                if "usage" in chunk:
                    out["tokens"] = chunk["usage"]["completion_tokens"]
        else:
            out["tokens"] = json.loads(resp.read())["usage"]["completion_tokens"]
        conn.close()
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        out["status"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


def run_load(url: str, args: LoadArgument) -> Dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: List[Dict] = []
    lock = threading.Lock()
    end = time.perf_counter() + args.duration

    def client(i: int):
        n = 0
        while time.perf_counter() < end:
            body = {"messages": [{"role": "user", "content": f"spell: {i} {n % 10} {(i + n) % 7}"}],
                    "max_tokens": args.max_tokens, "temperature": 0, "stream": args.stream}
            r = one_request(url, headers, body)
            with lock:
                results.append(r)
            n += 1

    before = health(url, headers)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = health(url, headers)
    ok = [r for r in results if r["status"] == 200]
    errors: Dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    batches = after.get("batches", 0) - before.get("batches", 0)
    return {
        "clients": args.clients, "duration_s": round(wall, 2), "requests": len(results), "ok": len(ok),
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "requests_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95), "latency_max_s": round(lat[-1], 3) if lat else None,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
        "server_batches": batches, "mean_batch": round((after.get("served", 0) - before.get("served", 0)) / batches, 2) if batches else None,
        "largest_batch": after.get("largest_batch"),
    }


def _pct(xs: List[float], p: float) -> Optional[float]:
    if not xs:
        return None
    return round(statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0], 3)


def health(url: str, headers: Dict[str, str]) -> Dict:
    u = urllib.parse.urlparse(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/health", headers=headers)
        resp = conn.getresponse()
        data = json.loads(resp.read()) if resp.status == 200 else {}
        conn.close()
        return data
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- servers we start
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch_size: int, log_path: str, timeout: float = 300):
    port = free_port()
    cmd = [sys.executable, os.path.join(REPO, "flask_server.py"), "--model_name_or_path", model, "--ui", "false",
           "--flask_port", str(port), "--max_batch_size", str(batch_size), "--max_queue", "256", "--src_length", "128"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        if health(url, {}).get("status") == "ok":
            return proc, url
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {timeout} s; see {log_path}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def build_model(args: LoadArgument, folder: str) -> str:
    code = ("from paddlellm.runtime import setup_runtime; setup_runtime()\n"
            "from paddlellm.commands.tiny import build_tiny\n"
            f"build_tiny('llama', {folder!r}, hidden_size={args.hidden_size}, num_hidden_layers={args.num_hidden_layers}, "
            f"intermediate_size={args.hidden_size * 8 // 3 // 64 * 64 or 64}, num_attention_heads={max(args.hidden_size // 64, 1)})\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return folder


def main(argv=None) -> int:
    (args,) = parse_args([LoadArgument], argv, prog="python bench/serve_load.py", description=__doc__.strip().splitlines()[0])
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1:
        fail("--clients, --duration and --max_tokens must be positive")
    runs = []
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure: recorded with them
    work = tempfile.mkdtemp(prefix="serve_load_")
    if args.url:
        print(f"load: {args.clients} clients x {args.duration:g} s against {args.url}", flush=True)
        runs.append({"server": args.url, **run_load(args.url, args)})
    else:
        model = args.model_name_or_path or build_model(args, os.path.join(work, "llama"))
        for bs in args.batch_sizes:
            proc, url = start_server(model, int(bs), os.path.join(work, f"server_bs{bs}.log"))
            try:
                print(f"load: {args.clients} clients x {args.duration:g} s, server --max_batch_size {bs}", flush=True)
                runs.append({"max_batch_size": int(bs), **run_load(url, args)})
            finally:
                stop_server(proc)
    for r in runs:
        print(json.dumps(r))
    result = {
        "benchmark": "serve_load",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_before": load_before, "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "model": args.url or args.model_name_or_path or f"random llama hidden {args.hidden_size} x {args.num_hidden_layers} layers (tiny tokenizer)",
        "settings": {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens, "stream": args.stream, "greedy": True},
        "runs": runs,
    }
    from benchlib import save_report

    save_report(args.output, result)
    print(f"saved {args.output}")
    failed = any(r["errors"] for r in runs)
    if failed:
        print(f"errors: see the server logs in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
