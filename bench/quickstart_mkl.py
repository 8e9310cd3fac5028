"""Why the quickstart's dev exact match differs between CPUs: run it under two MKL kernel choices on one machine.

    python bench/quickstart_mkl.py [--settings 5 4] [--out bench/results/quickstart_mkl.json]   (~2-4 min)

Each MKL_DEBUG_CPU_TYPE value (5 = AVX2 kernels, paddlellm's choice on AMD; 4 = AVX kernels; "" =
paddlellm's default for this CPU) gets a fresh quickstart process. Recorded per setting: a checksum of
one float32 matmul's bits (different kernels round differently) and the quickstart's figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from benchlib import REPO, machine_info, save_report

MATMUL = ("import hashlib, numpy as np, paddle; r = np.random.RandomState(0);"
          "a = paddle.to_tensor(r.randn(64, 300).astype('float32')); b = paddle.to_tensor(r.randn(300, 77).astype('float32'));"
          "print(hashlib.sha256(paddle.matmul(a, b).numpy().tobytes()).hexdigest()[:16])")


def run(setting: str, workdir: str) -> dict:
    env = dict(os.environ)
    env.pop("MKL_DEBUG_CPU_TYPE", None)
    if setting:
        env["MKL_DEBUG_CPU_TYPE"] = setting
    # The same CPU runtime (threads, MKL setting) as the quickstart: configure it, then import paddle.
    probe = f"from paddlellm.runtime import setup_runtime; setup_runtime(quiet=True); {MATMUL}"
    bits = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    out = os.path.join(workdir, f"qs-{setting or 'default'}")
    subprocess.run([sys.executable, "-m", "paddlellm.quickstart", "--output", out, "--disable_tqdm", "true"],
                   cwd=REPO, env=env, capture_output=True, text=True, check=True)
    with open(os.path.join(out, "quickstart_results.json"), encoding="utf-8") as f:
        results = json.load(f)
    return {"MKL_DEBUG_CPU_TYPE": setting or None, "matmul_bits_sha256": bits, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["5", "4"], help='MKL_DEBUG_CPU_TYPE values ("" = paddlellm default)')
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "quickstart_mkl.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for setting in args.settings:
            runs.append(run(setting, tmp))
            r = runs[-1]
            print(f"MKL_DEBUG_CPU_TYPE={setting or '(default)'}: matmul bits {r['matmul_bits_sha256']}, "
                  f"dev exact match {r['dev_exact_match_before']:.1f}% -> {r['dev_exact_match_after']:.1f}% ({r['seconds']:.0f} s)")
    path = save_report(args.out, {"machine": machine_info(), "runs": runs})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
