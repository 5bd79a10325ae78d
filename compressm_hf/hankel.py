"""Hankel singular values by the square-root method (paper Eq. 4; Antoulas 2005, Sec. 7.2).

The Hankel singular values are ``sigma_i = sqrt(lambda_i(P Q))``. Instead of taking eigenvalues of
the non-symmetric product ``P Q`` (what the reference code does, and what loses accuracy for small
``sigma``), we factor ``P = Lc Lc^H`` and ``Q = Lo Lo^H`` and take the singular values of
``Lo^H Lc``: ``(Lo^H Lc)(Lo^H Lc)^H = Lo^H P Lo`` has the same eigenvalues as ``P Q``.

The factors are Cholesky factors of ``P + delta I`` with a small relative jitter
``delta = jitter * trace(P) / n`` (Gramians of uncontrollable or unobservable systems are only
semi-definite). Where Cholesky still fails, the symmetric square root from ``eigh`` (negative
eigenvalues clipped to zero) is used instead.
"""

from __future__ import annotations

import torch

from ._checks import canonical_system, check_stable
from .gramians import _gramians, _mh

__all__ = ["hankel_singular_values"]

DEFAULT_JITTER = 1e-12


def _sqrt_factor(G: torch.Tensor, jitter: float) -> torch.Tensor:
    """``L`` with ``L L^H = G + delta I`` (``(..., n, n)``): Cholesky, or the eigh square root."""
    n = G.shape[-1]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    scale = torch.diagonal(G, dim1=-2, dim2=-1).real.mean(-1)  # 0 for a zero Gramian: eigh gives L = 0
    Gj = G + (jitter * scale)[..., None, None] * eye
    L, info = torch.linalg.cholesky_ex(Gj)
    if bool((info == 0).all()):
        return L
    w, U = torch.linalg.eigh(Gj)
    return U * w.clamp_min(0).sqrt()[..., None, :].to(U.dtype)


def _square_root_factors(
    P: torch.Tensor, Q: torch.Tensor, jitter: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Lc, Lo, M = Lo^H Lc)`` for the square-root method."""
    Lc = _sqrt_factor(P, jitter)
    Lo = _sqrt_factor(Q, jitter)
    return Lc, Lo, _mh(Lo) @ Lc


def hankel_singular_values(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    diagonal: bool | None = None,
    jitter: float = DEFAULT_JITTER,
) -> torch.Tensor:
    """Hankel singular values ``sigma_1 >= ... >= sigma_n >= 0`` of a stable discrete LTI system.

    Args:
        A: ``(..., n)`` diagonal of ``A`` or dense ``(..., n, n)``; real or complex.
        B: ``(..., n, m)``.
        C: ``(..., p, n)``.
        diagonal: layout of ``A`` (see :func:`compressm_hf.gramians`).
        jitter: relative Cholesky jitter, ``delta = jitter * trace(G) / n`` added to each Gramian.

    Returns:
        ``(..., n)`` float64, sorted descending. Differentiable (gradients are well defined where
        the ``sigma`` are distinct), e.g. for a Hankel-nuclear-norm regularizer ``hsv.sum()``.

    Raises:
        InvalidSystemError: shapes do not match, or an entry is NaN/Inf.
        UnstableSystemError: some ``|lambda(A)| >= 1``.
    """
    A, B, C, diagonal = canonical_system(A, B, C, diagonal=diagonal)
    check_stable(A, diagonal)
    P, Q = _gramians(A, B, C, diagonal)
    _, _, M = _square_root_factors(P, Q, jitter)
    return torch.linalg.svdvals(M)
