"""Pieces the benchmark scripts share: the machine they ran on, its float32 matmul throughput, saving a report."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from paddlellm import cpu_runtime  # noqa: E402  (stdlib only, safe before paddle)


def matmul_gflops(reps: int, n: int = 1024) -> float:
    """Best-of-`reps` GFLOP/s of an n x n float32 matmul (imports paddle: set the CPU runtime first)."""
    import paddle

    a, b = paddle.randn([n, n], dtype="float32"), paddle.randn([n, n], dtype="float32")
    for _ in range(3):
        (a @ b).numpy()  # .numpy() waits for the result
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        (a @ b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine_info() -> dict:
    """CPU, usable cores, Python and paddle versions, and the date: recorded with every figure."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for dist in ("paddlepaddle", "paddlenlp"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_model": cpu_runtime._cpuinfo_field(text, "model name") or platform.processor(),
        "cpu_vendor": cpu_runtime._cpuinfo_field(text, "vendor_id"),
        "avx2": "avx2" in (cpu_runtime._cpuinfo_field(text, "flags") or "").split(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cpu_runtime.usable_cpu_count(),
        "python": platform.python_version(),
        "paddle_version": versions["paddlepaddle"],
        "paddlenlp_version": versions["paddlenlp"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_report(path, report: dict) -> Path:
    """Write a benchmark's report as indented JSON (making its folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
