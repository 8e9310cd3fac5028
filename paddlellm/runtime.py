"""Process set-up shared by every command: CPU tuning before paddle loads, quiet warnings."""
from __future__ import annotations

import os
import warnings


def setup_runtime() -> None:
    """Configure the CPU runtime (must run before paddle is imported) and silence known-noisy warnings."""
    from . import cpu_runtime

    cpu_runtime.configure()
    # paddle's cpp_extension warns about ccache and setuptools about distutils at import: noise for users.
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*Setuptools is replacing distutils.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("FLAGS_call_stack_level", "0")
