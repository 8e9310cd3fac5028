"""Process set-up shared by every command: CPU tuning before paddle loads, known-noisy warnings off."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from typing import Dict, Optional

from .arguments import UserError

# paddle/base/__init__.py prints this on import whenever OMP_NUM_THREADS > 1. It dates from
# OpenBLAS builds; the wheels we use link MKL, where several threads are right (see cpu_runtime).
_STALE_PADDLE_WARNING = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY.")


class _DropLines(io.TextIOBase):
    """A stderr stand-in that forwards everything except lines starting with given prefixes."""

    def __init__(self, target, prefixes):
        self.target, self.prefixes = target, prefixes
        self.dropping = False

    def write(self, text):
        # print() writes the line and its "\n" in two calls: drop the newline of a dropped line too
        if text.startswith(self.prefixes) or (self.dropping and text == "\n"):
            self.dropping = text != "\n"
            return len(text)
        self.dropping = False
        self.target.write(text)
        return len(text)

    def flush(self):
        self.target.flush()


def setup_runtime(quiet: bool = False) -> None:
    """Configure the CPU runtime (must run before paddle is imported), then import paddle quietly.

    quiet=True also lowers PaddleNLP's own logging to warnings (used by the quickstart).
    """
    from . import cpu_runtime

    cpu_runtime.configure()
    cpu_runtime.keep_freed_memory()  # freed tensors stay in the heap: no page faults on every new activation
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*Setuptools is replacing distutils.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # paddlenlp 3.0.0b4's LLaMA calls a swiglu that paddle 3.3 deprecates, warning at every forward.
    warnings.filterwarnings("ignore", message=r"(?s).*paddle\.incubate\.nn\.functional\.swiglu.*")
    if "paddle" not in sys.modules:
        with contextlib.redirect_stderr(_DropLines(sys.stderr, _STALE_PADDLE_WARNING)):
            import paddle  # noqa: F401
    if quiet:
        from paddlenlp.utils.log import logger

        logger.set_level("WARNING")


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr for long work; PADDLELLM_NO_PROGRESS=1 turns every bar off (logs, tests)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("PADDLELLM_NO_PROGRESS") == "1")


def select_device(device: Optional[str]) -> str:
    import paddle

    cuda = paddle.device.is_compiled_with_cuda()
    if device is None or device == "auto":
        device = "gpu" if cuda and paddle.device.cuda.device_count() > 0 else "cpu"
    if device.startswith("gpu") and not cuda:
        raise UserError(f"--device {device}: this paddlepaddle build has no CUDA support (install paddlepaddle-gpu, or use --device cpu)")
    try:
        paddle.set_device(device)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"--device {device}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return device


def check_training_device(training: Dict, dtype: str = "float32", family=None, script: str = "finetune_generation.py") -> None:
    """Refuse what this device can't do, with one clear line (before anything is written).

    Tensor parallel runs on CPU processes too (paddlellm.cpu_parallel) for a `family` that supports it;
    without a family (callers that do not install the CPU ops) it is refused on CPU as before. `script`: the
    command's script, named in the hint for starting enough processes."""
    import paddle

    gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    tp = int(training.get("tensor_parallel_degree", 1) or 1)
    if tp > 1 and family is not None and not family.supports.get("tensor_parallel", False):
        raise UserError(f"--tensor_parallel_degree {tp}: tensor parallel is not supported for the {family.name} family "
                        "(see the README's support table); use data parallel instead")
    pp = int(training.get("pipeline_parallel_degree", 1) or 1)
    if pp > 1 and family is not None and not family.pipe_model_class:
        raise UserError(f"--pipeline_parallel_degree {pp}: paddlenlp has no pipeline-parallel model class for the {family.name} "
                        "family; use tensor_parallel_degree or data parallel instead")
    for key in ("tensor_parallel_degree", "sharding_parallel_degree"):
        if key == "tensor_parallel_degree" and family is not None:
            continue
        if int(training.get(key, 1) or 1) > 1 and not gpu:
            raise UserError(f"--{key} {training[key]}: tensor and sharding parallelism need GPUs (paddlepaddle-gpu); on CPU use data parallel: python -m paddle.distributed.launch --nproc_per_node N ...")
    world = int(os.environ.get("PADDLE_TRAINERS_NUM") or 1)  # processes paddle.distributed.launch started
    if tp * pp > 1 and world % (tp * pp):
        what = " x ".join(f"--{k}_parallel_degree {d}" for k, d in (("tensor", tp), ("pipeline", pp)) if d > 1)
        raise UserError(f"{what}: the model is split over {tp * pp} processes but this run has {world}; start it with "
                        f"python -m paddle.distributed.launch --nproc_per_node {tp * pp} {script} ...")
    for flag in ("fp16", "bf16"):
        if training.get(flag) and not gpu:
            # the shipped configs set fp16: true for GPUs; say exactly which override turns it off
            raise UserError(f"--{flag}: mixed precision needs a GPU here; pass --{flag} false to train in float32 on CPU")
    if dtype != "float32" and not gpu:
        raise UserError(f"--dtype {dtype}: paddle's CPU kernels have no {dtype} matmul; use --dtype float32 on CPU (or a GPU)")
