"""Process set-up shared by every command: CPU tuning before paddle loads, known-noisy warnings off."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

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
