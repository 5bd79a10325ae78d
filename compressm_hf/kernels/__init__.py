"""Optional compiled CPU kernels, built on first use with ``torch.utils.cpp_extension``.

Only the Mamba-1 selective scan lives here (``selective_scan_cpu.cpp``): a fused float32 forward and
backward, vectorised over 16 channels, with state checkpoints every ``CHUNK`` steps that the backward
recomputes from. Nothing is compiled when this module is imported; the first call to
:func:`is_available` (or :func:`selective_scan_cpu`) builds the extension into the torch extensions
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), in a directory keyed by the
source, flags, CPU, compiler, torch and interpreter (so venvs sharing the cache never rebuild over each
other). How builds are serialised, bounded and recovered after a killed build: :mod:`.cpu_build`.

Set ``COMPRESSM_DISABLE_CPP_KERNEL=1`` to never build or use it, and ``COMPRESSM_KERNEL_BUILD_TIMEOUT``
(seconds, default 900) to bound the wait for and the run of the build. Whenever the kernel is not
available, :func:`is_available` returns False with a logged warning and callers
(``modeling/mamba/scan_mamba.py``) fall back to the slower chunked torch scan.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from . import cpu_build

__all__ = ["CHUNK", "build_error", "is_available", "load", "selective_scan_cpu"]

logger = logging.getLogger(__name__)

# forward checkpoint interval == backward recompute chunk, in time steps
CHUNK = int(os.environ.get("COMPRESSM_SCAN_CHUNK", "64"))

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


def _groups(batch: int, nblk: int) -> int:
    """Channel-block groups per batch row in the backward: enough tasks for every thread."""
    threads = max(1, torch.get_num_threads())
    return max(1, min(nblk, -(-2 * threads // max(1, batch)))) if batch < 2 * threads else 1


class _SelectiveScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, store_dA):
        # u, delta, z are read with their own strides (a channels-innermost view, as Mamba's mixer passes,
        # costs no copy); B and C go to (batch, L, n) contiguous (n/d times smaller than u).
        f32 = torch.float32
        u_ = u.to(f32)
        dl_ = delta.to(f32)
        A_ = A.to(f32).contiguous()
        B_ = B.to(f32).transpose(1, 2).contiguous()
        C_ = C.to(f32).transpose(1, 2).contiguous()
        D_ = None if D is None else D.to(f32).contiguous()
        z_ = None if z is None else z.to(f32)
        bias_ = None if delta_bias is None else delta_bias.to(f32).contiguous()
        need_grad = any(ctx.needs_input_grad[:8])
        y, last, ckpt = torch.ops.compressm_scan.fwd(
            u_,
            dl_,
            A_,
            B_,
            C_,
            D_,
            z_,
            bias_,
            bool(delta_softplus),
            bool(return_last_state),
            need_grad,
            CHUNK,
        )
        ctx.delta_softplus = bool(delta_softplus)
        ctx.store_dA = bool(store_dA)
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        ctx.other_dtypes = tuple(None if t is None else t.dtype for t in (D, z, delta_bias))
        if need_grad:
            ctx.save_for_backward(u_, dl_, A_, B_, C_, D_, z_, bias_, ckpt)
        y = y.to(u.dtype)
        if return_last_state:
            return y, last.to(u.dtype)
        return y

    @staticmethod
    def backward(ctx, gy, *rest):
        u_, dl_, A_, B_, C_, D_, z_, bias_, ckpt = ctx.saved_tensors
        glast = rest[0] if rest else None
        gy_ = torch.zeros_like(u_) if gy is None else gy.to(torch.float32)
        glast_ = None if glast is None else glast.to(torch.float32).contiguous()
        nblk = -(-u_.shape[1] // 16)
        du, ddelta, dA, dB, dC, dD, dz = torch.ops.compressm_scan.bwd(
            u_,
            dl_,
            A_,
            B_,
            C_,
            D_,
            z_,
            bias_,
            ctx.delta_softplus,
            ckpt,
            gy_,
            glast_,
            CHUNK,
            ctx.store_dA,
            _groups(u_.shape[0], nblk),
        )
        has_D, has_z, has_bias = ctx.has
        udt, ddt, adt, bdt, cdt = ctx.dtypes
        Ddt, zdt, biasdt = ctx.other_dtypes
        return (
            du.to(udt),
            ddelta.to(ddt),
            dA.to(adt),
            dB.transpose(1, 2).to(bdt),
            dC.transpose(1, 2).to(cdt),
            dD.to(Ddt) if has_D else None,
            dz.to(zdt) if has_z else None,
            ddelta.sum((0, 2)).to(biasdt) if has_bias else None,
            None,
            None,
            None,
        )


def selective_scan_cpu(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    store_dA=None,
):
    """mamba_ssm ``selective_scan_fn`` semantics with the fused C++ kernel (CPU; computes in float32).

    u, delta: (batch, d, L); A: (d, n); B, C: (batch, n, L); D, delta_bias: (d,); z: (batch, d, L).
    Returns y (batch, d, L) in u's dtype, and the last state (batch, d, n) if ``return_last_state``.
    ``store_dA`` keeps exp(dt*A) of a recomputed chunk for the reverse sweep (one exp fewer per element);
    (default on: it was faster at every n measured).
    """
    if not is_available():
        raise RuntimeError(f"the C++ selective-scan kernel is not available: {build_error()}")
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu needs CPU tensors, got device {u.device}")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(
            f"selective_scan_cpu supports input-dependent B and C of shape (batch, n, L) only, got "
            f"B {tuple(B.shape)} and C {tuple(C.shape)}"
        )
    if store_dA is None:
        store_dA = True
    return _SelectiveScanCpu.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, store_dA
    )
