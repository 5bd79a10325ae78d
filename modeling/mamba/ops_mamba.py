"""Plain-torch versions of the small Mamba helpers that `modeling_compressm_mamba` takes from transformers.

``transformers.models.mamba.modeling_mamba`` defines ``apply_mask_to_padding_states``,
``causal_conv1d_fn``, ``causal_conv1d_update`` and ``mamba_selective_state_update`` as private module
functions (transformers 5.20 to 5.24; there they may also dispatch to hub kernels). They are not public
API, so the modeling file imports them when present and falls back to the definitions below, which
have the same signatures and semantics (tested against transformers' own in
``tests/mamba/test_modeling_mamba.py``).

This file imports only torch: it is copied next to saved models for ``trust_remote_code`` loading.

Layouts: ``hidden_states`` ``(batch, channels, length)``; depthwise conv ``weight`` ``(channels, kernel)``;
recurrent ``state`` ``(batch, d_inner, n)``; ``A`` ``(d_inner, n)``; ``B``, ``C`` ``(batch, n)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = [
    "apply_mask_to_padding_states",
    "causal_conv1d_channels_last",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "mamba_selective_state_update",
]


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation={activation!r} is not supported here; use 'silu' (Mamba's) or None.")


def apply_mask_to_padding_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
    """Zero the padding positions: ``hidden_states`` ``(batch, length, channels)``, mask ``(batch, length)``."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def causal_conv1d_fn(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    **kwargs,
) -> torch.Tensor:
    """Depthwise causal convolution over a whole sequence ``(batch, channels, length)``."""
    channels, length = hidden_states.shape[1], hidden_states.shape[2]
    out = F.conv1d(
        hidden_states.to(weight.dtype),
        weight.unsqueeze(1),
        bias,
        padding=weight.shape[-1] - 1,
        groups=channels,
    )[:, :, :length]
    return _activate(out, activation).to(hidden_states.dtype)


def _cpp_kernels():
    if os.environ.get("COMPRESSM_CONV_IMPL", "auto").strip().lower() == "torch":
        return None
    try:
        from compressm_hf import kernels
    except ImportError:  # copied next to a saved model, without compressm_hf installed
        return None
    return kernels if kernels.is_available() else None


def causal_conv1d_channels_last(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution of a whole sequence in channels-last layout ``(batch, length, channels)``.

    On CPU with the compiled kernels (``compressm_hf.kernels.causal_conv1d_cpu``: fused conv + SiLU, forward
    and backward, no layout copies) unless ``COMPRESSM_CONV_IMPL=torch``; elsewhere
    :func:`causal_conv1d_fn` (the reference) on the transposed view. Returns ``(batch, length, channels)``.
    """
    kernels = (
        _cpp_kernels()
        if hidden_states.device.type == "cpu" and activation in (None, "silu", "swish")
        else None
    )
    if kernels is not None:
        return kernels.causal_conv1d_cpu(hidden_states, weight, bias, activation)
    return causal_conv1d_fn(hidden_states.transpose(1, 2), weight, bias, activation).transpose(1, 2)


def causal_conv1d_update(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One (or a few) decoding steps of the causal convolution; updates ``conv_state`` in place."""
    channels, length = hidden_states.shape[1], hidden_states.shape[2]
    window = torch.cat([conv_state, hidden_states], dim=-1).to(weight.dtype)
    conv_state.copy_(window[:, :, -conv_state.shape[-1] :])
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=channels)[:, :, -length:]
    return _activate(out, activation).to(hidden_states.dtype)


def mamba_selective_state_update(
    state: torch.Tensor,
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    z: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """One recurrent step ``h = exp(dt A) h + dt B x``, ``y = C h + D x`` (gated by ``silu(z)``), in place.

    ``hidden_states``, ``dt``, ``z``: ``(batch, d_inner)``; returns ``y`` ``(batch, d_inner)``.
    """
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt32 = dt.float()[..., None]
    new_state = (
        state.float() * torch.exp(dt32 * A.float())
        + dt32 * B.float()[:, None, :] * (hidden_states.float()[..., None])
    )
    state.copy_(new_state.to(state.dtype))
    out = torch.matmul(new_state.to(C.dtype), C.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        out = out + hidden_states * D
    if z is not None:
        out = out * F.silu(z)
    return out.to(hidden_states.dtype)


def plain_off_cuda(dispatching, plain):
    """``dispatching`` (transformers' helper: the CUDA package if installed, else a warning "install
    causal_conv1d / mamba_ssm ... much slower") for CUDA tensors, ``plain`` (the same result in plain torch)
    for any other device, where those CUDA-only packages could not run and the warning would be false."""
    if dispatching is plain:
        return plain

    def call(first, *args, **kwargs):
        return (dispatching if first.is_cuda else plain)(first, *args, **kwargs)

    return call
