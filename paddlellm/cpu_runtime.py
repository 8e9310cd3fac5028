"""Configure the CPU math runtime (OpenMP/MKL threads, MKL code path) before paddle loads.

OpenMP and MKL read their environment variables once, when paddle's shared libraries are
loaded, so this module must run before ``import paddle`` and therefore imports only the
standard library. Left alone, paddle runs on one thread (its bootstrap forces
``OMP_NUM_THREADS=1`` when unset) and MKL takes a slow generic path on non-Intel CPUs.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Optional

__all__ = ["Decision", "decide", "usable_cpu_count", "configure", "DISABLE_VAR", "keep_freed_memory", "set_malloc_thresholds"]

DISABLE_VAR = "PADDLELLM_CPU_TUNING"
_OFF_VALUES = {"0", "false", "off", "no"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
MKL_CPU_VAR = "MKL_DEBUG_CPU_TYPE"
# Value 5 makes MKL dispatch its AVX2 kernels regardless of the vendor string.
_MKL_AVX2 = "5"

_VENDOR_NAMES = {
    "GenuineIntel": "Intel",
    "AuthenticAMD": "AMD",
    "HygonGenuine": "Hygon",
    "CentaurHauls": "Centaur",
    "Shanghai": "Zhaoxin",
}


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` chose: variables to set and a one-line human reason."""

    env: dict = field(default_factory=dict)
    reason: str = ""


def _cpuinfo_field(cpuinfo_text: str, name: str) -> Optional[str]:
    """Value of the first ``name : value`` line of /proc/cpuinfo, or None."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def _local_processes(environ: Mapping[str, str]) -> tuple:
    """(local process count, local rank) of this process on its host.

    ``paddle.distributed.launch`` sets PADDLE_LOCAL_SIZE / PADDLE_LOCAL_RANK. The legacy
    ``paddle.distributed.fleet.launch`` sets neither, so fall back to counting the trainer
    endpoints on this host and to PADDLE_RANK_IN_NODE.
    """
    size = _int_env(environ, "PADDLE_LOCAL_SIZE")
    if size is None:
        current = environ.get("PADDLE_CURRENT_ENDPOINT", "")
        endpoints = [e for e in environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",") if e]
        if current and endpoints:
            host = current.rsplit(":", 1)[0]
            size = sum(1 for e in endpoints if e.rsplit(":", 1)[0] == host)
    size = max(size or 1, 1)
    rank = _int_env(environ, "PADDLE_LOCAL_RANK")
    if rank is None:
        rank = _int_env(environ, "PADDLE_RANK_IN_NODE")
    rank = min(max(rank or 0, 0), size - 1)
    return size, rank


def _thread_share(usable_cpus: int, size: int, rank: int) -> int:
    """This rank's share of the cores; the remainder goes to the lowest ranks."""
    base, extra = divmod(max(usable_cpus, 1), size)
    return max(base + (1 if rank < extra else 0), 1)


def decide(environ: Mapping[str, str], cpuinfo_text: str, usable_cpus: int) -> Decision:
    """Choose the CPU runtime variables for this process; pure, changes nothing."""
    switch = environ.get(DISABLE_VAR)
    if switch is not None and switch.strip().lower() in _OFF_VALUES:
        return Decision({}, f"tuning disabled by {DISABLE_VAR}={switch}, environment left unchanged")

    env: dict = {}
    parts = []

    # An empty value counts as unset: OpenMP, MKL and paddle all ignore it.
    user_threads = [f"{v}={environ[v]}" for v in THREAD_VARS if environ.get(v)]
    if user_threads:
        # Filling in the other variable from our own count could contradict the user's
        # choice (MKL follows OMP_NUM_THREADS when MKL_NUM_THREADS is unset): leave both.
        parts.append(f"threads left as set ({' '.join(user_threads)})")
    else:
        size, rank = _local_processes(environ)
        threads = _thread_share(usable_cpus, size, rank)
        for v in THREAD_VARS:
            env[v] = str(threads)
        where = f"{usable_cpus} usable core{'s' if usable_cpus != 1 else ''}, "
        where += f"{size} local process{'es' if size != 1 else ''}"
        if size > 1:
            where += f", local rank {rank}"
        parts.append(f"{' '.join(f'{v}={threads}' for v in THREAD_VARS)} ({where})")

    vendor = _cpuinfo_field(cpuinfo_text, "vendor_id")
    flags = (_cpuinfo_field(cpuinfo_text, "flags") or "").split()
    name = f"{_VENDOR_NAMES.get(vendor or '', vendor)} CPU"
    if environ.get(MKL_CPU_VAR):
        parts.append(f"{MKL_CPU_VAR} left as set ({environ[MKL_CPU_VAR]})")
    elif vendor is None or not flags:
        parts.append("MKL code path unchanged (not an x86 CPU or vendor unknown)")
    elif vendor == "GenuineIntel":
        parts.append("MKL code path unchanged (Intel CPU)")
    elif "avx2" in flags:
        # Only x86 CPUs report "avx2" in the flags line, so any non-Intel vendor here is x86.
        env[MKL_CPU_VAR] = _MKL_AVX2
        parts.append(f"{MKL_CPU_VAR}={_MKL_AVX2} ({name} with AVX2)")
    else:
        parts.append(f"MKL code path unchanged ({name} without AVX2)")

    return Decision(env, ", ".join(parts))


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ancestors(root: str, rel: str) -> list:
    """``root/rel`` and each parent directory up to ``root`` itself (limits nest)."""
    dirs = []
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    while parts:
        dirs.append(os.path.join(root, *parts))
        parts.pop()
    dirs.append(root)
    return dirs


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> Optional[int]:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` or v1 CFS quota, or None if unlimited.

    Rounds down (at least 1): more threads than the quota get throttled mid-barrier.
    """
    v2_path, v1_path = "/", "/"
    for line in (_read(self_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[0] == "0" and fields[1] == "":
            v2_path = fields[2]
        elif "cpu" in fields[1].split(","):
            v1_path = fields[2]

    limits = []
    for d in _ancestors(root, v2_path):
        text = _read(os.path.join(d, "cpu.max"))
        fields = (text or "").split()
        if fields and fields[0] != "max":
            period = fields[1] if len(fields) > 1 else "100000"
            try:
                limits.append(int(fields[0]) / int(period))
            except (ValueError, ZeroDivisionError):
                pass
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in _ancestors(os.path.join(root, mount), v1_path):
            quota = _read(os.path.join(d, "cpu.cfs_quota_us"))
            period = _read(os.path.join(d, "cpu.cfs_period_us"))
            try:
                q, p = int(quota), int(period)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if q > 0 and p > 0:
                limits.append(q / p)
    if not limits:
        return None
    return max(int(math.floor(min(limits))), 1)


def usable_cpu_count() -> int:
    """Cores this process may run on: CPU affinity, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(min(n, limit) if limit else n, 1)


_configured: Optional[Decision] = None


def configure(environ: MutableMapping[str, str] = os.environ, log: bool = True) -> Decision:
    """Apply :func:`decide` to ``environ`` and log one line to stderr; once per process."""
    global _configured
    if _configured is not None:
        return _configured
    decision = decide(environ, _read("/proc/cpuinfo") or "", usable_cpu_count())
    _configured = decision
    if decision.env and "paddle" in sys.modules:
        # The OpenMP/MKL runtimes already read their settings when paddle loaded.
        if log:
            wanted = " ".join(f"{k}={v}" for k, v in decision.env.items())
            print(
                f"paddlellm: CPU runtime: WARNING: paddle is already imported, too late to set "
                f"{wanted}; call paddlellm.cpu_runtime.configure() before importing paddle",
                file=sys.stderr,
            )
        return decision
    environ.update(decision.env)
    if log:
        hint = f"; set {DISABLE_VAR}=0 to disable" if decision.env else ""
        print(f"paddlellm: CPU runtime: {decision.reason}{hint}", file=sys.stderr)
    return decision


_MEMORY_KEPT = False


def keep_freed_memory() -> None:
    """Make glibc keep freed large blocks for reuse instead of unmapping them (once per process).

    Workaround (paddle CPU allocator + glibc defaults): a tensor above glibc's mmap threshold (128 KiB, raised
    dynamically up to 32 MiB) gets its own mmap, and its free returns the pages to the kernel, so the next
    tensor of that size page-faults fresh memory in. Every op of a training step or a decode step makes new
    activation tensors of a few MB, so on the 2-core machine an elementwise multiply of [8, 170, 8, 64] took
    0.75 ms instead of 0.07 ms, and concatenating a [32, 8, 300, 64] KV cache ~37 ms instead of ~2-3 ms.
    Raising the mmap and trim thresholds keeps freed blocks in the heap. Only the process's peak memory
    stays reserved; no result changes. No-op where glibc is absent.
    """
    global _MEMORY_KEPT
    if _MEMORY_KEPT:
        return
    _MEMORY_KEPT = True
    set_malloc_thresholds(1 << 30)


def set_malloc_thresholds(nbytes: int) -> bool:
    """glibc mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (bench/generate_throughput.py resets them for the
    'before' arm); False where it is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, nbytes)) and bool(libc.mallopt(m_trim_threshold, nbytes))
    except (OSError, AttributeError):
        return False
