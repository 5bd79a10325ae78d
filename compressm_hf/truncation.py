"""Balanced truncation (paper Eq. 9-10) and modal truncation of diagonal systems.

Square-root balancing (Laub et al. 1987; Antoulas 2005, Sec. 7.2): with ``P = Lc Lc^H``,
``Q = Lo Lo^H`` and the SVD ``Lo^H Lc = U S V^H`` (``S = diag(sigma)``, the Hankel singular values),

    T = Lc V S^(-1/2)   (n, n)        T^-1 = S^(-1/2) U^H Lo^H   (n, n)

balances the system: ``T^-1 P T^-H = T^H Q T = S``. Keeping the balanced coordinates ``keep`` gives
``A_r = T_inv A T``, ``B_r = T_inv B``, ``C_r = C T`` with the ``(n, r)`` right projection ``T`` and the
``(r, n)`` left projection ``T_inv`` (only the kept columns/rows are formed). For the leading ``r``
coordinates the result is stable and ``||G - G_r||_inf <= 2 * sum(discarded sigma)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import canonical_system, check_rank, check_stable
from .errors import InvalidRankError, InvalidSystemError
from .gramians import _gramians, _mh
from .hankel import DEFAULT_JITTER, _square_root_factors

__all__ = ["BalancedTruncation", "balanced_truncation", "modal_importance", "modal_truncation"]


@dataclass
class BalancedTruncation:
    """Result of :func:`balanced_truncation` (``...`` are the batch dims of the input).

    Attributes:
        A: ``(..., r, r)`` reduced dense state matrix ``T_inv A T``.
        B: ``(..., r, m)`` reduced input matrix ``T_inv B``.
        C: ``(..., p, r)`` reduced output matrix ``C T``.
        hsv: ``(..., n)`` float64 Hankel singular values of the full system, descending.
        T: ``(..., n, r)`` right projection (kept columns of the balancing transform).
        T_inv: ``(..., r, n)`` left projection (kept rows of its inverse); ``T_inv @ T = I_r``.
        error_bound: ``(...)`` float64, ``2 * sum`` of the discarded ``hsv`` (the H-infinity bound
            when the leading coordinates are kept).
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    hsv: torch.Tensor
    T: torch.Tensor
    T_inv: torch.Tensor
    error_bound: torch.Tensor


def _check_keep(keep: object, n: int, name: str = "keep") -> torch.Tensor:
    if not isinstance(keep, torch.Tensor):
        keep = torch.as_tensor(keep)
    if keep.ndim != 1 or keep.numel() < 1 or keep.is_floating_point() or keep.is_complex():
        raise InvalidRankError(
            f"{name} must be a 1-D integer tensor of state indices in [0, {n}), "
            f"got shape {tuple(keep.shape)}, dtype {keep.dtype}"
        )
    keep = keep.to(torch.int64)
    if bool(((keep < 0) | (keep >= n)).any()):
        raise InvalidRankError(f"{name} indices must lie in [0, {n}), got {keep.tolist()}")
    if torch.unique(keep).numel() != keep.numel():
        raise InvalidRankError(f"{name} indices must be distinct, got {keep.tolist()}")
    if keep.numel() > n:
        raise InvalidRankError(f"{name} may hold at most n={n} indices, got {keep.numel()}")
    return keep


def balanced_truncation(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    rank: int | None = None,
    keep: torch.Tensor | None = None,
    *,
    diagonal: bool | None = None,
    jitter: float = DEFAULT_JITTER,
) -> BalancedTruncation:
    """Square-root balanced truncation of a stable discrete LTI system.

    Args:
        A: ``(..., n)`` diagonal or ``(..., n, n)`` dense, real or complex.
        B: ``(..., n, m)``.
        C: ``(..., p, n)``.
        rank: number of states ``r`` to keep, in ``[1, n]``. May be omitted when ``keep`` is given.
        keep: ``(r,)`` indices of the balanced coordinates to keep (shared across the batch); default
            the leading ``r`` (largest ``sigma``). The ``smallest`` ablation passes the trailing ``r``.
        diagonal: layout of ``A`` (see :func:`compressm_hf.gramians`).
        jitter: relative Cholesky jitter (see :func:`compressm_hf.hankel_singular_values`).

    Returns:
        :class:`BalancedTruncation`, complex128 if any input is complex, else float64. Balanced
        coordinates whose ``sigma`` is below ``eps * sigma_1`` (numerically uncontrollable or
        unobservable) are scaled with ``eps * sigma_1`` instead, to stay finite.

    Raises:
        InvalidSystemError / UnstableSystemError: as for :func:`compressm_hf.gramians`.
        InvalidRankError: ``rank`` outside ``[1, n]``, bad ``keep``, or ``len(keep) != rank``.
    """
    A, B, C, diagonal = canonical_system(A, B, C, diagonal=diagonal)
    n = A.shape[-1]
    if keep is None:
        if rank is None:
            raise InvalidRankError("give rank (an int in [1, n]) or keep (indices of balanced coordinates)")
        rank = check_rank(rank, n)
        keep = torch.arange(rank)
    else:
        keep = _check_keep(keep, n)
        if rank is not None and check_rank(rank, n) != keep.numel():
            raise InvalidRankError(f"rank={rank} but keep holds {keep.numel()} indices; they must agree")
    check_stable(A, diagonal)

    return _truncate(A, B, C, diagonal, _balance(A, B, C, diagonal, jitter), keep)


def _balance(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, diagonal: bool, jitter: float):
    """``(S, U, Vh, Lc, Lo)``: the SVD ``Lo^H Lc = U diag(S) Vh`` and the Gramian square roots."""
    P, Q = _gramians(A, B, C, diagonal)
    Lc, Lo, M = _square_root_factors(P, Q, jitter)
    U, S, Vh = torch.linalg.svd(M)
    return S, U, Vh, Lc, Lo


def _truncate(A, B, C, diagonal: bool, balance, keep: torch.Tensor) -> BalancedTruncation:
    """Project onto the balanced coordinates ``keep`` (inputs already validated)."""
    S, U, Vh, Lc, Lo = balance
    n = S.shape[-1]
    keep = keep.to(S.device)
    floor = S[..., :1] * torch.finfo(torch.float64).eps
    s_inv_sqrt = torch.maximum(S, floor).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    s_k = s_inv_sqrt[..., keep].to(Lc.dtype)
    T = (Lc @ _mh(Vh)[..., :, keep]) * s_k[..., None, :]
    T_inv = s_k[..., :, None] * (_mh(U)[..., keep, :] @ _mh(Lo))

    AT = A[..., :, None] * T if diagonal else A @ T
    A_r = T_inv @ AT
    B_r = T_inv @ B
    C_r = C @ T
    discarded = torch.ones(n, dtype=torch.bool, device=S.device)
    discarded[keep] = False
    error_bound = 2 * S[..., discarded].sum(-1)
    for name, t in (("A", A_r), ("B", B_r), ("C", C_r)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise InvalidSystemError(
                f"balanced truncation produced a non-finite reduced {name}; the Gramians are too "
                f"ill-conditioned (max HSV {float(S.max())!r})"
            )
    return BalancedTruncation(A=A_r, B=B_r, C=C_r, hsv=S, T=T, T_inv=T_inv, error_bound=error_bound)


def modal_importance(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Per-state Hankel importance ``sqrt(P_ii Q_ii)`` of a diagonal system.

    State ``i`` on its own is the 1-state system ``(lambda_i, B[i, :], C[:, i])``, whose only Hankel
    singular value is ``||B_i|| ||C_i|| / (1 - |lambda_i|^2) = sqrt(P_ii Q_ii)``. Dropping a set of
    modes changes the transfer function by at most ``sum ||B_i|| ||C_i|| / (1 - |lambda_i|)
    <= 2 * sum`` of their importances (a rigorous H-infinity bound for modal truncation).

    Args:
        A: ``(..., n)`` eigenvalues ``lambda``; B: ``(..., n, m)``; C: ``(..., p, n)``.

    Returns:
        ``(..., n)`` float64, in state order (not sorted). Differentiable.

    Raises:
        InvalidSystemError / UnstableSystemError: bad shapes, NaN/Inf, or ``|lambda| >= 1``.
    """
    A, B, C, _ = canonical_system(A, B, C, diagonal=True)
    check_stable(A, True)
    b2 = (B.abs() ** 2).sum(-1)
    c2 = (C.abs() ** 2).sum(-2)
    return torch.sqrt(b2 * c2) / (1 - A.abs() ** 2)


def modal_truncation(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the diagonal states ``keep``: ``(A[..., keep], B[..., keep, :], C[..., :, keep])``.

    Args:
        A: ``(..., n)`` diagonal; B: ``(..., n, m)``; C: ``(..., p, n)``.
        keep: ``(r,)`` distinct int indices in ``[0, n)``.

    Returns:
        The kept subsystem, same dtypes as the inputs (no promotion, no copy of unkept states).

    Raises:
        InvalidSystemError: ``A`` is not diagonal-shaped or shapes do not match.
        InvalidRankError: bad ``keep``.
    """
    canonical_system(A, B, C, diagonal=True)
    if A.ndim != B.ndim - 1:
        raise InvalidSystemError(
            f"modal_truncation needs a diagonal A (..., n) next to B (..., n, m); got A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}"
        )
    keep = _check_keep(keep, A.shape[-1]).to(A.device)
    return A[..., keep], B[..., keep, :], C[..., :, keep]
