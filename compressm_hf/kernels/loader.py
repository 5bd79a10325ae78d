"""Building and loading the compiled CPU kernels once per process, and why they are unavailable when they are.

The build itself (serialised, bounded, recovered after a killed build) is :mod:`.cpu_build`. Set
``COMPRESSM_DISABLE_CPP_KERNEL=1`` to never build or use the kernels.
"""

from __future__ import annotations

import logging
import os
import threading

from . import cpu_build

__all__ = ["build_error", "is_available", "load"]

logger = logging.getLogger("compressm_hf.kernels")  # the package's logger: its warnings name the package

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def load() -> bool:
    """Build (once per process) and load the extension. Returns whether it is usable."""
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        _state["tried"] = True
        if os.environ.get("COMPRESSM_DISABLE_CPP_KERNEL", "0").strip().lower() in ("1", "true", "yes"):
            _state["error"] = "disabled by COMPRESSM_DISABLE_CPP_KERNEL"
            logger.warning(
                "compressm_hf: C++ selective-scan kernel disabled by COMPRESSM_DISABLE_CPP_KERNEL; "
                "using the slower chunked torch scan."
            )
            return False
        try:
            cpu_build.build_and_load()
        except Exception as exc:
            _state["error"] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "compressm_hf: the fused C++ selective-scan kernel is unavailable; using the slower "
                "chunked torch scan. Reason: %s",
                _state["error"],
            )
            return False
        _state["ok"] = True
        return True


def is_available() -> bool:
    """True when the compiled CPU scan can be used (builds it on the first call)."""
    return load()


def build_error() -> str | None:
    """Why the kernel is not available (None if it is, or if no build was attempted yet)."""
    return None if _state["ok"] else _state["error"]  # type: ignore[return-value]
