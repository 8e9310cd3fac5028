"""Decisions of paddlellm.cpu_runtime: no timing, fake /proc/cpuinfo and cgroup trees."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddlellm import cpu_runtime as cr

REPO = Path(__file__).resolve().parents[1]

INTEL_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma
"""
AMD_NO_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD Opteron(tm) Processor 6272
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx fma4 xop
"""
HYGON_AVX2 = """processor\t: 0
vendor_id\t: HygonGenuine
flags\t\t: fpu sse sse2 avx avx2
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
"""


def threads(n):
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


# ---- vendor / instruction set -------------------------------------------------------------

def test_amd_with_avx2_gets_threads_and_mkl_avx2_path():
    d = cr.decide({}, AMD_AVX2, 2)
    assert d.env == {**threads(2), "MKL_DEBUG_CPU_TYPE": "5"}
    assert d.reason == (
        "OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 (2 usable cores, 1 local process), "
        "MKL_DEBUG_CPU_TYPE=5 (AMD CPU with AVX2)"
    )


def test_intel_keeps_mkl_path():
    d = cr.decide({}, INTEL_AVX2, 16)
    assert d.env == threads(16)
    assert "MKL code path unchanged (Intel CPU)" in d.reason


def test_amd_without_avx2_keeps_mkl_path():
    d = cr.decide({}, AMD_NO_AVX2, 4)
    assert d.env == threads(4)
    assert "AMD CPU without AVX2" in d.reason


def test_other_non_intel_x86_with_avx2_gets_mkl_avx2_path():
    d = cr.decide({}, HYGON_AVX2, 1)
    assert d.env == {**threads(1), "MKL_DEBUG_CPU_TYPE": "5"}
    assert "(1 usable core, 1 local process)" in d.reason
    assert "Hygon CPU with AVX2" in d.reason


@pytest.mark.parametrize("text", [ARM, ""])
def test_arm_or_unknown_vendor_only_sets_threads(text):
    d = cr.decide({}, text, 8)
    assert d.env == threads(8)
    assert "MKL code path unchanged" in d.reason


# ---- user settings and the off switch -----------------------------------------------------

def test_user_thread_count_is_respected():
    d = cr.decide({"OMP_NUM_THREADS": "1"}, AMD_AVX2, 8)
    # No MKL_NUM_THREADS either: it would override the user's 1 for MKL.
    assert d.env == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert "threads left as set (OMP_NUM_THREADS=1)" in d.reason


def test_user_mkl_threads_alone_is_respected():
    d = cr.decide({"MKL_NUM_THREADS": "3"}, INTEL_AVX2, 8)
    assert d.env == {}


def test_empty_values_count_as_unset():
    env = {"OMP_NUM_THREADS": "", "MKL_DEBUG_CPU_TYPE": ""}
    assert cr.decide(env, AMD_AVX2, 2).env == {**threads(2), "MKL_DEBUG_CPU_TYPE": "5"}


def test_user_mkl_cpu_type_is_respected():
    d = cr.decide({"MKL_DEBUG_CPU_TYPE": "4"}, AMD_AVX2, 2)
    assert d.env == threads(2)
    assert "MKL_DEBUG_CPU_TYPE left as set (4)" in d.reason


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_disable_switch_changes_nothing(value):
    d = cr.decide({"PADDLELLM_CPU_TUNING": value}, AMD_AVX2, 8)
    assert d.env == {}
    assert "disabled" in d.reason


def test_switch_on_value_still_tunes():
    assert cr.decide({"PADDLELLM_CPU_TUNING": "1"}, AMD_AVX2, 2).env["OMP_NUM_THREADS"] == "2"


# ---- per-process share under paddle.distributed.launch ------------------------------------

@pytest.mark.parametrize(
    "usable, size, rank, expected",
    [(8, 2, 0, 4), (8, 2, 1, 4), (2, 4, 3, 1), (2, 2, 1, 1), (3, 2, 0, 2), (3, 2, 1, 1)],
)
def test_launcher_share(usable, size, rank, expected):
    env = {"PADDLE_LOCAL_SIZE": str(size), "PADDLE_LOCAL_RANK": str(rank),
           "PADDLE_TRAINERS_NUM": str(size * 2), "PADDLE_NNODES": "2"}
    d = cr.decide(env, INTEL_AVX2, usable)
    assert d.env == threads(expected)
    assert f"{size} local processes, local rank {rank}" in d.reason


def test_legacy_launcher_counts_endpoints_on_this_host():
    env = {
        "PADDLE_TRAINER_ENDPOINTS": "10.0.0.1:6170,10.0.0.1:6171,10.0.0.2:6170,10.0.0.2:6171",
        "PADDLE_CURRENT_ENDPOINT": "10.0.0.2:6171",
        "PADDLE_RANK_IN_NODE": "1",
        "PADDLE_TRAINERS_NUM": "4",
    }
    assert cr.decide(env, INTEL_AVX2, 8).env == threads(4)


def test_bad_launcher_values_fall_back_to_one_process():
    d = cr.decide({"PADDLE_LOCAL_SIZE": "abc", "PADDLE_LOCAL_RANK": "x"}, INTEL_AVX2, 6)
    assert d.env == threads(6)


# ---- cgroup quota ------------------------------------------------------------------------

def _proc_cgroup(tmp_path, text):
    p = tmp_path / "self_cgroup"
    p.write_text(text)
    return str(p)


def test_cgroup_v2_quota(tmp_path):
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("250000 100000\n")
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, "0::/job\n")) == 2


def test_cgroup_v2_parent_limit_applies(tmp_path):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("100000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, "0::/a/b\n")) == 1


def test_cgroup_v2_unlimited(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, "0::/\n")) is None


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cg"
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    text = "4:memory:/x\n3:cpu,cpuacct:/\n0::/\n"
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, text)) == 3


def test_cgroup_v1_no_quota_and_small_quota(tmp_path):
    root = tmp_path / "cg"
    cpu = root / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    text = "1:cpu:/\n"
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, text)) is None
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")
    assert cr._cgroup_cpu_limit(str(root), _proc_cgroup(tmp_path, text)) == 1


def test_no_cgroup_fs(tmp_path):
    assert cr._cgroup_cpu_limit(str(tmp_path / "missing"), str(tmp_path / "missing2")) is None


def test_usable_cpu_count_is_capped_by_cgroup(monkeypatch):
    monkeypatch.setattr(cr.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(cr, "_cgroup_cpu_limit", lambda: 3)
    assert cr.usable_cpu_count() == 3
    monkeypatch.setattr(cr, "_cgroup_cpu_limit", lambda: None)
    assert cr.usable_cpu_count() == 8


# ---- configure() -------------------------------------------------------------------------

@pytest.fixture
def fresh(monkeypatch):
    """A configure() that has not run yet, on a fixed machine, with paddle not imported."""
    monkeypatch.setattr(cr, "_configured", None)
    monkeypatch.setattr(cr, "_read", lambda path: AMD_AVX2 if path == "/proc/cpuinfo" else None)
    monkeypatch.setattr(cr, "usable_cpu_count", lambda: 2)
    monkeypatch.delitem(sys.modules, "paddle", raising=False)


def test_configure_writes_env_and_logs_once(fresh, capsys):
    env = {"PADDLE_LOCAL_SIZE": "1"}
    d = cr.configure(env)
    assert env == {"PADDLE_LOCAL_SIZE": "1", **threads(2), "MKL_DEBUG_CPU_TYPE": "5"}
    err = capsys.readouterr().err
    assert err == (
        "paddlellm: CPU runtime: OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 (2 usable cores, "
        "1 local process), MKL_DEBUG_CPU_TYPE=5 (AMD CPU with AVX2); "
        "set PADDLELLM_CPU_TUNING=0 to disable\n"
    )
    other = {}
    assert cr.configure(other) is d
    assert other == {}
    assert capsys.readouterr().err == ""


def test_configure_disabled_leaves_env(fresh, capsys):
    env = {"PADDLELLM_CPU_TUNING": "0"}
    cr.configure(env)
    assert env == {"PADDLELLM_CPU_TUNING": "0"}
    assert "disabled" in capsys.readouterr().err


def test_configure_quiet(fresh, capsys):
    env = {}
    cr.configure(env, log=False)
    assert env["OMP_NUM_THREADS"] == "2"
    assert capsys.readouterr().err == ""


def test_configure_after_paddle_import_is_too_late(fresh, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "paddle", object())
    env = {}
    cr.configure(env)
    assert env == {}
    err = capsys.readouterr().err
    assert "too late" in err and err.count("\n") == 1


def test_configure_in_clean_subprocess():
    code = (
        "import sys, os, paddlellm.cpu_runtime as c; c.configure(); c.configure(); "
        "print('paddle' in sys.modules, os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    n = str(cr.usable_cpu_count())
    assert res.stdout.split() == ["False", n, n]
    lines = res.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"paddlellm: CPU runtime: OMP_NUM_THREADS={n} MKL_NUM_THREADS={n} ("
                               f"{n} usable core")
    assert lines[0].endswith("; set PADDLELLM_CPU_TUNING=0 to disable")
