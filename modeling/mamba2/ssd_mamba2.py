"""The Mamba-2 state space dual (SSD) layer in plain torch: a chunked scan and the one-token recurrent step.

Per head ``h`` (scalar decay ``A_h < 0``) and group ``g = h // (heads / groups)`` (B and C shared by the
group's heads), with ``dt`` already discretized (:func:`discretize_dt`):

    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T        (head_dim x n)
    y_t     = state_t C_t + D_h x_t

:func:`ssd_chunk_scan` evaluates this over a whole sequence in chunks of ``chunk_size`` tokens (the
chunked form of the Mamba-2 paper): inside a chunk a masked ``(C B^T) * decay`` "attention" product, across
chunks a short recurrence over the chunk-boundary states. Contractions run per *group* (``C B^T`` once per
group, not per head), and nothing here depends on a fixed state size, so every layer can have its own ``n``.
:func:`ssd_state_update` is the one-token step used by cached decoding. The tests compare both with a
plain token-by-token loop (``tests/mamba2/test_ssd.py``).

Imports only torch: this file is copied next to saved models for ``trust_remote_code`` loading.

Shapes: ``b`` batch, ``L`` length, ``h`` heads, ``p`` head_dim, ``g`` groups, ``n`` state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "SCAN_BLOCK",
    "discretize_dt",
    "scan_block",
    "ssd_chunk_scan",
    "ssd_chunk_scan_reference",
    "ssd_state_update",
]


def discretize_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor, limit: tuple[float, float] = (0.0, float("inf"))
) -> torch.Tensor:
    """``clamp(softplus(dt + dt_bias), *limit)`` in float32: ``dt`` ``(..., h)``, ``dt_bias`` ``(h,)``."""
    dt = F.softplus(dt.float() + dt_bias.float())
    return torch.clamp(dt, min=limit[0], max=limit[1])


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``j <= i`` and ``-inf`` above the diagonal.

    ``a`` ``(..., T)`` -> ``(..., T, T)``. Computed as a masked cumulative sum (not as a difference of
    two cumulative sums), so long chunks with strong decay keep their precision.
    """
    T = a.shape[-1]
    x = a[..., None].expand(*a.shape, T)  # x[..., k, j] = a[..., k]
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, -torch.inf)


def _chunk_layout(x: torch.Tensor, B: torch.Tensor, chunk_size: int):
    """Shapes of a scan and its chunking: ``(b, L, h, p, g, n, heads per group, chunk T, padding, chunks)``."""
    b, L, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if h % g != 0:
        raise ValueError(f"the number of heads ({h}) must be a multiple of the number of groups ({g}).")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    T = min(int(chunk_size), L) if L > 0 else 1
    pad = (-L) % T
    return b, L, h, p, g, n, h // g, T, pad, (L + pad) // T


def ssd_chunk_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The SSD scan over a whole sequence, in chunks (float32 inside).

    Args:
        x: ``(b, L, h, p)`` head inputs.
        dt: ``(b, L, h)`` discretized time steps (:func:`discretize_dt`); a zero step leaves the state as is.
        A: ``(h,)`` negative decay rates.
        B, C: ``(b, L, g, n)`` input and output matrices, shared by the ``h // g`` heads of a group.
        chunk_size: tokens per chunk (``>= 1``); the result does not depend on it (up to rounding).
        D: ``(h,)`` skip connection, or ``None``.
        initial_state: ``(b, h, p, n)`` state before the first token, or ``None`` (zeros).
        return_final_state: also return the state after the last token.

    Returns:
        ``y`` ``(b, L, h, p)`` float32, and with ``return_final_state`` the ``(b, h, p, n)`` final state.
    """
    b, L, h, p, g, n, r, T, pad, nc = _chunk_layout(x, B, chunk_size)

    xf = x.float()
    dt = dt.float()
    xdt = xf * dt[..., None]  # input scaled by its step: (b, L, h, p)
    a = dt * A.float()  # log-decay per token and head: (b, L, h)
    Bf, Cf = B.float(), C.float()
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))  # zero log-decay and zero input: padding leaves the state unchanged
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))

    xc = xdt.reshape(b, nc, T, g, r, p)
    Bc = Bf.reshape(b, nc, T, g, n)
    Cc = Cf.reshape(b, nc, T, g, n)
    ac = a.reshape(b, nc, T, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, T)
    a_cum = torch.cumsum(ac, dim=-1)

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
    decay = torch.exp(_segment_sum(ac))  # (b, g, r, c, l, s)
    scores = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # once per group
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores[:, :, None] * decay, xc)

    # 2. state each chunk adds at its end: sum_s exp(a_{s+1} + ... + a_T) dt_s x_s B_s^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, g, r, c, T)
    chunk_states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", Bc, to_end, xc)

    # 3. across chunks: the state at the start of every chunk (a short loop over chunks)
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, g, r, c)
    if initial_state is None:
        state = xc.new_zeros(b, g, r, p, n)
    else:
        state = initial_state.float().reshape(b, g, r, p, n)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[..., c, None, None] * state + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # (b, c, g, r, p, n)

    # 4. what the start state contributes inside its chunk: exp(a_1 + ... + a_l) C_l state_start
    y = y + torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, start_states, torch.exp(a_cum))

    y = y.reshape(b, nc * T, h, p)[:, :L]
    if D is not None:
        y = y + D.float()[:, None] * xf
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


# Tokens per block of the fast scan when a model's ``chunk_size`` is larger (see :func:`scan_block`).
SCAN_BLOCK = 64


def scan_block(chunk_size: int) -> int:
    """Block length that :func:`ssd_chunk_scan` should use for a model whose ``config.chunk_size`` is given.

    The result does not depend on the block length (up to rounding), only the cost does: per token the
    intra-block work grows with the block (``(C B^T) * decay`` is ``block x block`` per head), the
    state passing does not. On CPU a block of ``SCAN_BLOCK`` (64) tokens is the fastest at head_dim 64 and
    d_state 16..128 (``benchmarks/bench_mamba2_step.py``), so larger configured chunks are split.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return min(int(chunk_size), SCAN_BLOCK)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The SSD scan over a whole sequence, in chunks (float32 inside): fast layout, same results.

    Same arguments, results and gradients as :func:`ssd_chunk_scan_reference` (the tests compare them),
    computed with every contraction a plain batched matmul over ``(batch, chunk, group)``: the
    ``(b, c, g, r, l, s)`` decay is built once from a float64 difference of cumulative sums (no masked
    ``(.., l, s)`` cumsum, whose backward flips and re-sums it), ``C B^T`` once per group, and the chunk
    states and their read-out contract the heads of a group together (``r * p`` columns) against ``B`` and
    ``C``. Use :func:`scan_block` to pick ``chunk_size`` from a model's config.

    Args:
        x: ``(b, L, h, p)`` head inputs.
        dt: ``(b, L, h)`` discretized time steps (:func:`discretize_dt`).
        A: ``(h,)`` negative decay rates.
        B, C: ``(b, L, g, n)``, shared by the ``h // g`` heads of a group.
        chunk_size: tokens per chunk (``>= 1``).
        D: ``(h,)`` skip connection, or ``None``.
        initial_state: ``(b, h, p, n)`` or ``None`` (zeros).
        return_final_state: also return the ``(b, h, p, n)`` state after the last token.

    Returns:
        ``y`` ``(b, L, h, p)`` float32 (and the final state).
    """
    b, L, h, p, g, n, r, T, pad, nc = _chunk_layout(x, B, chunk_size)

    xf = x.float()
    dt = dt.float()
    xdt = xf * dt[..., None]
    a = dt * A.float()
    Bf, Cf = B.float(), C.float()
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))

    X = xdt.reshape(b, nc, T, g, r * p).transpose(2, 3).contiguous()  # (b, c, g, T, r p)
    Bg = Bf.reshape(b, nc, T, g, n).transpose(2, 3).contiguous()  # (b, c, g, T, n)
    Cg = Cf.reshape(b, nc, T, g, n).transpose(2, 3).contiguous()
    a_cum = torch.cumsum(a.reshape(b, nc, T, g, r).permute(0, 1, 3, 4, 2), dim=-1)  # (b, c, g, r, T)
    Xh = X.view(b, nc, g, T, r, p).transpose(3, 4)  # (b, c, g, r, T, p) view

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) dt_s x_s
    a64 = a_cum.double()
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    seg = (a64[..., :, None] - a64[..., None, :]).float().masked_fill(~lower, -torch.inf)
    scores = Cg @ Bg.transpose(-1, -2)  # (b, c, g, l, s), once per group
    y = (torch.exp(seg) * scores[:, :, :, None]) @ Xh  # (b, c, g, r, T, p)

    # 2. state each chunk adds at its end, all heads of a group in one product: (r p, T) @ (T, n)
    to_end = torch.exp(a_cum[..., -1:] - a_cum).transpose(-1, -2)  # (b, c, g, T, r)
    Xs = (X.view(b, nc, g, T, r, p) * to_end[..., None]).view(b, nc, g, T, r * p)
    chunk_states = (Xs.transpose(-1, -2) @ Bg).view(b, nc, g, r, p, n)

    # 3. across chunks: the state at the start of every chunk
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, g, r, 1, 1)
    if initial_state is None:
        state = X.new_zeros(b, g, r, p, n)
    else:
        state = initial_state.float().reshape(b, g, r, p, n)
    starts = []
    # unbind, not [:, c]: the backward of an index allocates (and zero-fills) the whole tensor every chunk
    for decay_c, added_c in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        starts.append(state)
        state = decay_c * state + added_c
    start_states = torch.stack(starts, dim=1).view(b, nc, g, r * p, n)

    # 4. the start state read out inside its chunk: exp(a_cum_l) C_l state_start
    y_off = (Cg @ start_states.transpose(-1, -2)).view(b, nc, g, T, r, p)
    y_off = y_off * torch.exp(a_cum).transpose(-1, -2)[..., None]
    y = y.transpose(3, 4) + y_off  # (b, c, g, T, r, p)
    y = y.transpose(2, 3).reshape(b, nc * T, h, p)[:, :L]
    if D is not None:
        y = y + D.float()[:, None] * xf
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step, updating ``state`` in place.

    Args:
        state: ``(b, h, p, n)`` recurrent state (any float dtype; overwritten with the new state).
        x: ``(b, h, p)`` head inputs of this token.
        dt: ``(b, h)`` discretized time steps (:func:`discretize_dt`).
        A: ``(h,)`` negative decay rates.
        B, C: ``(b, g, n)``.
        D: ``(h,)`` or ``None``.

    Returns:
        ``y`` ``(b, h, p)`` float32.
    """
    h, g = x.shape[1], B.shape[-2]
    r = h // g
    dt = dt.float()
    decay = torch.exp(dt * A.float())  # (b, h)
    Bh = B.float().repeat_interleave(r, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(r, dim=1)
    new_state = (
        state.float() * decay[..., None, None] + (dt[..., None] * x.float())[..., None] * Bh[:, :, None]
    )
    state.copy_(new_state.to(state.dtype))
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y
