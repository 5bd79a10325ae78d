"""Mamba-1 selective scan: a plain reference loop, a chunked pure-torch scan, and a dispatcher.

This file imports only torch at module level: it is copied next to saved models for
``trust_remote_code=True`` loading. Faster implementations are picked up when present:

* ``mamba_ssm``'s CUDA ``selective_scan_fn`` for CUDA tensors, if ``mamba_ssm`` imports;
* the fused C++ CPU kernel from ``compressm_hf.kernels`` (built on first use), for CPU tensors;
* otherwise :func:`selective_scan_chunked` (pure torch, any device, any float dtype).

All three follow mamba_ssm's ``selective_scan_fn`` layout and semantics::

    u, delta: (batch, d, L)   A: (d, n)   B, C: (batch, n, L)   D, delta_bias: (d,)   z: (batch, d, L)
    dt  = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t         (h_{-1} = 0, per channel d and state n)
    y_t = C_t . h_t + D * u_t ;  y = y * silu(z)
    returns y (batch, d, L) [, last state h_{L-1} (batch, d, n) if return_last_state]

With ``moments=ScanMoments(weights)``, a scan also collects the sums over tokens that the averaged LTI
surrogate of a Mamba layer needs (fused into the C++ forward, which computes ``exp(dt*A)`` anyway;
:func:`surrogate_moments_ref` on every other path).

Choose the implementation with the ``impl`` argument or the environment variable
``COMPRESSM_SCAN_IMPL`` in {auto, cpp, chunked, ref, mamba_ssm}; :func:`scan_implementation` says which
one a call would use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = [
    "SCAN_IMPLS",
    "ScanMoments",
    "surrogate_moments_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "scan_implementation",
]

SCAN_IMPLS = ("auto", "cpp", "chunked", "ref", "mamba_ssm")
_ENV = "COMPRESSM_SCAN_IMPL"


def _discretize_dt(delta, delta_bias, delta_softplus):
    dt = delta if delta_bias is None else delta + delta_bias[..., None].to(delta.dtype)
    return F.softplus(dt) if delta_softplus else dt


def _epilogue(y, u, D, z):
    if D is not None:
        y = y + u * D[..., None].to(u.dtype)
    if z is not None:
        y = y * F.silu(z)
    return y


# ----------------------------------------------------------------------------------------------------
# Reference: a plain loop over time. Slices come from unbind (O(L) autograd), not from indexing in the
# loop (whose backward allocates a full-size zero tensor per step: O(L^2), transformers' CPU path).
# ----------------------------------------------------------------------------------------------------
def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Sequential reference scan (differentiable through autograd; any dtype and device)."""
    dt = _discretize_dt(delta, delta_bias, delta_softplus)
    batch, d, _ = u.shape
    h = u.new_zeros(batch, d, A.shape[-1])
    ys = []
    for u_t, dt_t, B_t, C_t in zip(u.unbind(-1), dt.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    y = _epilogue(y, u, D, z)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------------------
# Chunked pure torch: forward without a graph (states kept at chunk starts), backward recomputes one
# chunk at a time and sweeps it in reverse. Time-major layout so every per-step slice is contiguous.
# ----------------------------------------------------------------------------------------------------
_CHUNK_ELEMS = 1 << 21  # elements of one (T, batch, d, n) chunk tensor (8 MiB in float32)


def _chunk_len(batch, d, n, length):
    t = _CHUNK_ELEMS // max(1, batch * d * n)
    return int(max(4, min(128, t, max(1, length))))


class _ChunkedScan(torch.autograd.Function):
    """y_scan = C . h (no D, no gate) and the last state; inputs already discretised (dt)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        L, batch, d = u.shape[2], u.shape[0], u.shape[1]
        n = A.shape[-1]
        T = _chunk_len(batch, d, n, L)
        u_t = u.permute(2, 0, 1).contiguous()  # (L, b, d)
        dt_t = dt.permute(2, 0, 1).contiguous()
        B_t = B.permute(2, 0, 1).contiguous()  # (L, b, n)
        C_t = C.permute(2, 0, 1).contiguous()
        h = u.new_zeros(batch, d, n)
        y = u.new_empty(L, batch, d)
        ckpts = []
        for t0 in range(0, L, T):
            t1 = min(L, t0 + T)
            ckpts.append(h)
            dA = torch.exp(dt_t[t0:t1, :, :, None] * A)  # (T, b, d, n)
            H = (dt_t[t0:t1] * u_t[t0:t1])[..., None] * B_t[t0:t1, :, None, :]  # dt*B*u, becomes H in place
            for i in range(t1 - t0):
                H[i].addcmul_(dA[i], h)
                h = H[i]
            torch.matmul(H, C_t[t0:t1, :, :, None], out=y[t0:t1, :, :, None])
            h = h.clone()
        ctx.T = T
        ctx.save_for_backward(u_t, dt_t, A, B_t, C_t, torch.stack(ckpts) if ckpts else h[None])
        return y.permute(1, 2, 0), h

    @staticmethod
    def backward(ctx, gy, glast):
        u_t, dt_t, A, B_t, C_t, ckpts = ctx.saved_tensors
        T = ctx.T
        L, batch, d = u_t.shape
        n = A.shape[-1]
        gy_t = gy.permute(2, 0, 1).contiguous() if gy is not None else u_t.new_zeros(L, batch, d)
        dh = glast.clone() if glast is not None else u_t.new_zeros(batch, d, n)
        du = torch.empty_like(u_t)
        ddt = torch.empty_like(dt_t)
        dB = torch.empty_like(B_t)
        dC = torch.empty_like(C_t)
        dA_param = torch.zeros_like(A)
        starts = list(range(0, L, T))
        for c in reversed(range(len(starts))):
            t0 = starts[c]
            t1 = min(L, t0 + T)
            k = t1 - t0
            dt_c, u_c, B_c, C_c, gy_c = dt_t[t0:t1], u_t[t0:t1], B_t[t0:t1], C_t[t0:t1], gy_t[t0:t1]
            dA = torch.exp(dt_c[..., None] * A)
            dtu = dt_c * u_c
            Hall = u_t.new_empty(k + 1, batch, d, n)
            Hall[0] = ckpts[c]
            torch.mul(dtu[..., None], B_c[:, :, None, :], out=Hall[1:])
            for i in range(k):
                Hall[i + 1].addcmul_(dA[i], Hall[i])
            dH = torch.mul(gy_c[..., None], C_c[:, :, None, :])  # dy (x) C, accumulated in place
            for i in range(k - 1, -1, -1):
                dH[i].add_(dh)
                dh = dH[i] * dA[i]
            # everything else is a batched contraction over the chunk
            # (batched mat-vecs on the contiguous chunk tensors: no permuted copies)
            torch.matmul(gy_c[:, :, None, :], Hall[1:], out=dC[t0:t1, :, None, :])
            torch.matmul(dtu[:, :, None, :], dH, out=dB[t0:t1, :, None, :])
            S = torch.matmul(dH, B_c[..., None])[..., 0]  # sum_n dH * B
            G = dH.mul_(Hall[:-1]).mul_(dA)  # d loss / d (dt * A), reuses dH's memory
            ddt[t0:t1] = torch.matmul(G[..., None, :], A[..., None])[..., 0, 0] + S * u_c
            dA_param += G.mul_(dt_c[..., None]).sum((0, 1))
            du[t0:t1] = S * dt_c
        return du.permute(1, 2, 0), ddt.permute(1, 2, 0), dA_param, dB.permute(1, 2, 0), dC.permute(1, 2, 0)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Pure-torch scan with O(L) time and O(chunk) extra memory; custom backward (recompute per chunk).
    float16/bfloat16 inputs are computed in float32 (as mamba_ssm does) and returned in u's dtype."""
    out_dtype = u.dtype
    if u.dtype in (torch.float16, torch.bfloat16):
        u, delta, A, B, C, D, z, delta_bias = (
            None if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias)
        )
    dt = _discretize_dt(delta, delta_bias, delta_softplus)
    y, last = _ChunkedScan.apply(u, dt, A.to(u.dtype), B.to(u.dtype), C.to(u.dtype))
    y = _epilogue(y, u, D, z).to(out_dtype)
    return (y, last.to(out_dtype)) if return_last_state else y


# ----------------------------------------------------------------------------------------------------
# Surrogate moments (the statistics of a Mamba layer's averaged LTI surrogate)
# ----------------------------------------------------------------------------------------------------
_MOMENT_CHUNK_ELEMENTS = 1 << 22  # elements of one (d, n, tokens) decay chunk of the reference


class ScanMoments:
    """Request for, and result of, the surrogate moments collected by one :func:`selective_scan` call.

    Args:
        weights: optional ``(batch, L)`` token weights (1 = real token, 0 = padding); None = all 1.

    After the scan, ``one_minus_decay`` and ``input_energy`` hold ``(d, n)`` float64 sums over tokens
    (see :func:`surrogate_moments_ref`) and ``source`` names the path that computed them
    (``"fused"`` or ``"reference"``).
    """

    def __init__(self, weights=None):
        self.weights = weights
        self.one_minus_decay = None
        self.input_energy = None
        self.source = None


@torch.no_grad()
def surrogate_moments_ref(u, delta, A, B, delta_bias=None, delta_softplus=False, weights=None):
    """Reference (pure torch) surrogate moments, summed over batch and time.

    Args: ``u``, ``delta``: ``(batch, d, L)``; ``A``: ``(d, n)``; ``B``: ``(batch, n, L)``;
    ``delta_bias``: ``(d,)``; ``weights``: ``(batch, L)`` or None. Computed in float32.

    Returns:
        ``(one_minus_decay, input_energy)``, both ``(d, n)`` float64:
        ``Σ_t w_t (1 − exp(dt_t A))`` (as ``-expm1``: accurate for tiny ``dt A``) and
        ``Σ_t w_t (dt_t u_t)² B_t²``, with ``dt`` discretised as the scan does.
    """
    b, d, L = u.shape
    n = A.shape[-1]
    delta = _discretize_dt(delta.float(), delta_bias, delta_softplus)
    drive2 = (delta * u.float()) ** 2  # (b, d, L)
    w = None if weights is None else weights.to(torch.float32)
    if w is not None:
        drive2 = drive2 * w[:, None, :]
    Bf = B.float()
    input_energy = torch.einsum("bdl,bnl->dn", drive2, Bf * Bf).double()
    # tokens laid out (d, n, tokens) so that the reduction runs over the contiguous last dim
    delta_t = delta.transpose(0, 1).reshape(d, b * L)
    w_t = None if w is None else w.reshape(b * L)
    A = A.float()
    one_minus_decay = torch.zeros(d, n, dtype=torch.float64, device=u.device)
    chunk = max(1, _MOMENT_CHUNK_ELEMENTS // max(1, d * n))
    for t0 in range(0, b * L, chunk):
        m1 = -torch.expm1(delta_t[:, None, t0 : t0 + chunk] * A[:, :, None])  # (d, n, chunk)
        if w_t is not None:
            m1 = m1 * w_t[t0 : t0 + chunk]
        one_minus_decay += m1.sum(dim=-1).double()
    return one_minus_decay, input_energy


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------
_mamba_ssm_fn = None


def _mamba_ssm():
    global _mamba_ssm_fn
    if _mamba_ssm_fn is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # ImportError, or a broken CUDA build
            selective_scan_fn = False
        _mamba_ssm_fn = selective_scan_fn
    return _mamba_ssm_fn or None


def _cpp_kernels():
    try:
        from compressm_hf import kernels
    except ImportError:  # the file was copied next to a saved model, without compressm_hf installed
        return None
    return kernels if kernels.is_available() else None


def _requested(impl):
    name = (impl if impl is not None else os.environ.get(_ENV, "auto")).strip().lower() or "auto"
    if name not in SCAN_IMPLS:
        source = "impl" if impl is not None else _ENV
        raise ValueError(
            f"unknown selective-scan implementation {source}={name!r}; expected one of {SCAN_IMPLS}"
        )
    return name


def scan_implementation(device="cpu", dtype=torch.float32, impl=None):
    """Name of the implementation :func:`selective_scan` runs for tensors on ``device`` with ``dtype``:
    one of ``"mamba_ssm"``, ``"cpp"``, ``"chunked"``, ``"ref"``. May build the C++ kernel."""
    name = _requested(impl)
    device = torch.device(device)
    if name != "auto":
        if name == "cpp" and (device.type != "cpu" or _cpp_kernels() is None):
            from_ = "impl" if impl is not None else _ENV
            raise RuntimeError(
                f"{from_}='cpp' was requested but the C++ CPU kernel cannot run here (device {device}; "
                f"{_cpp_error()})"
            )
        if name == "mamba_ssm" and (device.type != "cuda" or _mamba_ssm() is None):
            raise RuntimeError(f"'mamba_ssm' was requested but it cannot run here (device {device})")
        return name
    if device.type == "cuda" and _mamba_ssm() is not None:
        return "mamba_ssm"
    cpp_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cpu" and dtype in cpp_dtypes and _cpp_kernels() is not None:
        return "cpp"
    return "chunked"


def _cpp_error():
    try:
        from compressm_hf import kernels
    except ImportError:
        return "compressm_hf is not installed"
    return kernels.build_error() or "unknown reason"


def selective_scan(
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
    impl=None,
    moments=None,
):
    """Selective scan with mamba_ssm's ``selective_scan_fn`` signature; picks the fastest available
    implementation (see the module docstring). ``impl`` overrides ``COMPRESSM_SCAN_IMPL``.
    ``moments`` (a :class:`ScanMoments`) is filled with the surrogate moments of this call."""
    name = scan_implementation(u.device, u.dtype, impl)
    if name == "cpp":
        if moments is None:
            return _cpp_kernels().selective_scan_cpu(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
            )
        *out, moments.one_minus_decay, moments.input_energy = _cpp_kernels().selective_scan_cpu(
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
            moments=True,
            moment_weights=moments.weights,
        )
        moments.source = "fused"
        return tuple(out) if return_last_state else out[0]
    if moments is not None:
        moments.one_minus_decay, moments.input_energy = surrogate_moments_ref(
            u, delta, A, B, delta_bias, delta_softplus, moments.weights
        )
        moments.source = "reference"
    if name == "mamba_ssm":
        return _mamba_ssm()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    fn = selective_scan_ref if name == "ref" else selective_scan_chunked
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
