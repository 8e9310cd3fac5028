"""The quickstart's figure depends on MKL's kernels (see bench/quickstart_mkl.py), so it says where it was measured."""
import os


def test_quickstart_records_cpu_and_mkl_setting(monkeypatch):
    from paddlellm.quickstart import machine

    with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    assert machine() == {"cpu": model, "threads": "2", "mkl_path": "MKL_DEBUG_CPU_TYPE=4"}
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE")
    assert machine()["mkl_path"] == "MKL's own choice"
