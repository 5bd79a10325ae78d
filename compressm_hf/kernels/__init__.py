"""Optional compiled CPU kernels, built on first use with ``torch.utils.cpp_extension``.

The Mamba-1 selective scan (``selective_scan_cpu.cpp``): a fused float32 forward and backward,
vectorised over 16 channels, with state checkpoints every ``CHUNK`` steps that the backward recomputes
from (and, on request, the surrogate moments of the forward); and Mamba's depthwise causal conv1d + SiLU
in channels-last layout (:func:`causal_conv1d_cpu`). Nothing is compiled when this module is imported; the first call to
:func:`is_available` (or :func:`selective_scan_cpu`) builds the extension into the torch extensions
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), in a directory keyed by the
source, flags, CPU, compiler, torch and interpreter (so venvs sharing the cache never rebuild over each
other). How builds are serialised, bounded and recovered after a killed build: :mod:`.cpu_build`.

This file is a face: loading is :mod:`.loader`, the scan :mod:`.selective_scan`, the convolution
:mod:`.conv1d`.

Set ``COMPRESSM_DISABLE_CPP_KERNEL=1`` to never build or use it, and ``COMPRESSM_KERNEL_BUILD_TIMEOUT``
(seconds, default 900) to bound the wait for and the run of the build. Whenever the kernel is not
available, :func:`is_available` returns False with a logged warning and callers
(``modeling/mamba/scan_mamba.py``) fall back to the slower chunked torch scan.
"""

from __future__ import annotations

from . import cpu_build, loader  # noqa: F401  (submodules, reached as kernels.loader / kernels.cpu_build)
from .conv1d import causal_conv1d_cpu
from .loader import build_error, is_available, load, logger  # noqa: F401  (logger: the package's)
from .selective_scan import CHUNK, selective_scan_cpu

__all__ = ["CHUNK", "build_error", "causal_conv1d_cpu", "is_available", "load", "selective_scan_cpu"]
