"""bench/generate_throughput.py with paddle.inference's IR passes off for the static arm (a probe, issue 21).

Runs generate_throughput.py with the same arguments after making every paddle.inference predictor of this process
call Config.switch_ir_optim(False) (paddlellm's own create_predictor turns them on); compare its static / loop
ratios with a plain run's (bench/README_generate.md, "Two math threads"). The peak-memory children are not patched.

    python bench/static_ir_off.py --family gpt --arms loop,static --batches 1,8,32 --orders bucketed --rounds 3 ...
"""
import argparse
import os
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from paddlellm.cpu_runtime import configure  # noqa: E402

# paddle is imported below, before generate_throughput.py parses its arguments: its --threads must reach the CPU
# runtime here (generate_throughput.py sets it the same way before paddle loads), or our arms would keep the default
# thread count while the report and the peer say --threads
_parser = argparse.ArgumentParser(add_help=False)
_parser.add_argument("--threads", type=int, default=None)
_threads = _parser.parse_known_args()[0].threads
if _threads:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
configure()  # before paddle is imported, as generate_throughput.py's own run does

import paddle.inference as paddle_infer  # noqa: E402

_create = paddle_infer.create_predictor


def _without_ir_passes(config):
    config.switch_ir_optim(False)
    return _create(config)


paddle_infer.create_predictor = _without_ir_passes  # formats/static.create_predictor looks it up at call time
sys.argv = [str(BENCH / "generate_throughput.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
