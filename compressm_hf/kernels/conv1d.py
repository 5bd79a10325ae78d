"""Mamba's depthwise causal conv1d (+ SiLU) on CPU, channels last, fused C++ forward and backward."""

from __future__ import annotations

import torch

from .loader import build_error, is_available

__all__ = ["causal_conv1d_cpu"]


class _CausalConv1dCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        f32 = torch.float32
        x_ = x.to(f32)
        if x_.stride(2) != 1:
            x_ = x_.contiguous()
        w_ = weight.to(f32).t().contiguous()  # (K, d)
        b_ = None if bias is None else bias.to(f32).contiguous()
        ctx.silu = bool(silu)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x_, w_, b_)
        return torch.ops.compressm_scan.conv_fwd(x_, w_, b_, ctx.silu).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x_, w_, b_ = ctx.saved_tensors
        gy_ = gy.to(torch.float32)
        if gy_.stride(2) != 1:
            gy_ = gy_.contiguous()
        dx, dw, db = torch.ops.compressm_scan.conv_bwd(x_, w_, b_, ctx.silu, gy_)
        xdt, wdt, bdt = ctx.dtypes
        return dx.to(xdt), dw.t().to(wdt), None if b_ is None else db.to(bdt), None


def causal_conv1d_cpu(x, weight, bias=None, activation=None):
    """Depthwise causal conv1d over ``x`` ``(batch, L, d)`` (channels last; any batch/time strides),
    ``weight`` ``(d, K)``, ``bias`` ``(d,)``, ``activation`` None or ``"silu"``/``"swish"``; computes in
    float32 and returns ``(batch, L, d)`` contiguous in x's dtype. Fused C++ forward and backward; the
    reference is ``modeling/mamba/ops_mamba.causal_conv1d_fn`` (channels first)."""
    if not is_available():
        raise RuntimeError(f"the C++ CPU kernels are not available: {build_error()}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.device.type != "cpu" or x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"causal_conv1d_cpu needs CPU x (batch, L, d) and weight (d, K); got x {tuple(x.shape)} on "
            f"{x.device} and weight {tuple(weight.shape)}"
        )
    return _CausalConv1dCpu.apply(x, weight, bias, activation is not None)
