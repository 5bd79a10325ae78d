"""The fused float32 Mamba-1 selective scan on CPU (``selective_scan_cpu.cpp``): forward and backward,
vectorised over 16 channels, with state checkpoints every :data:`CHUNK` steps that the backward recomputes
from (and, on request, the surrogate moments of the forward)."""

from __future__ import annotations

import os

import torch

from .loader import build_error, is_available

__all__ = ["CHUNK", "selective_scan_cpu"]

# forward checkpoint interval == backward recompute chunk, in time steps
CHUNK = int(os.environ.get("COMPRESSM_SCAN_CHUNK", "64"))


def _groups(batch: int, nblk: int) -> int:
    """Channel-block groups per batch row in the backward: enough tasks for every thread."""
    threads = max(1, torch.get_num_threads())
    return max(1, min(nblk, -(-2 * threads // max(1, batch)))) if batch < 2 * threads else 1


class _SelectiveScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        store_dA,
        moments,
        weights,
    ):
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
        w_ = None if weights is None else weights.to(f32).contiguous()
        y, last, ckpt, om, ie = torch.ops.compressm_scan.fwd(
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
            bool(moments),
            w_,
        )
        ctx.delta_softplus = bool(delta_softplus)
        ctx.return_last_state = bool(return_last_state)
        ctx.store_dA = bool(store_dA)
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        ctx.other_dtypes = tuple(None if t is None else t.dtype for t in (D, z, delta_bias))
        if need_grad:
            ctx.save_for_backward(u_, dl_, A_, B_, C_, D_, z_, bias_, ckpt)
        y = y.to(u.dtype)
        if moments:
            ctx.mark_non_differentiable(om, ie)
        if return_last_state:
            return (y, last.to(u.dtype), om, ie) if moments else (y, last.to(u.dtype))
        return (y, om, ie) if moments else y

    @staticmethod
    def backward(ctx, gy, *rest):
        u_, dl_, A_, B_, C_, D_, z_, bias_, ckpt = ctx.saved_tensors
        glast = rest[0] if ctx.return_last_state else None  # the moments' gradients (if any) are ignored
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
    moments=False,
    moment_weights=None,
):
    """mamba_ssm ``selective_scan_fn`` semantics with the fused C++ kernel (CPU; computes in float32).

    u, delta: (batch, d, L); A: (d, n); B, C: (batch, n, L); D, delta_bias: (d,); z: (batch, d, L).
    Returns y (batch, d, L) in u's dtype, and the last state (batch, d, n) if ``return_last_state``.
    ``store_dA`` keeps exp(dt*A) of a recomputed chunk for the reverse sweep (one exp fewer per element);
    (default on: it was faster at every n measured).

    ``moments=True`` also returns, last, the Mamba surrogate's moments summed over tokens while the
    forward computes ``exp(dt*A)`` anyway: ``one_minus_decay = Σ w·(1 − exp(dt·A))`` and
    ``input_energy = Σ w·(dt·u)²·B²``, both (d, n) float64 and not differentiable; ``moment_weights``
    (batch, L) weighs each token (default 1). Reference: ``scan_mamba.surrogate_moments_ref``.
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
    if moment_weights is not None and tuple(moment_weights.shape) != (u.shape[0], u.shape[2]):
        raise ValueError(
            f"moment_weights must have shape (batch, L) = {(u.shape[0], u.shape[2])}, got "
            f"{tuple(moment_weights.shape)}"
        )
    return _SelectiveScanCpu.apply(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        store_dA,
        bool(moments),
        moment_weights if moments else None,
    )
