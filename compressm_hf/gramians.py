"""Discrete-time controllability and observability Gramians (paper Sec. 2, Eq. 3-5 and 14).

For a stable system ``x[k+1] = A x[k] + B u[k]``, ``y[k] = C x[k]`` the Gramians solve the discrete
Lyapunov equations

    A P A^H - P + B B^H = 0        (controllability, P = sum_k A^k B B^H (A^H)^k)
    A^H Q A - Q + C^H C = 0        (observability,   Q = sum_k (A^H)^k C^H C A^k)

For diagonal ``A = diag(lambda)`` they have the closed form used by the CompreSSM code
(``dlyap_direct_diagonal``):

    P_ij = (B B^H)_ij / (1 - lambda_i conj(lambda_j)),   Q_ij = (C^H C)_ij / (1 - conj(lambda_i) lambda_j)

Dense ``A`` is solved with the Smith doubling iteration ``P <- P + A_k P A_k^H``, ``A_k <- A_k^2``, which
converges quadratically (``k`` steps sum ``2^k`` terms of the series) and is differentiable by autograd.
"""

from __future__ import annotations

import torch

from ._checks import canonical_system, check_stable
from .errors import InvalidSystemError

__all__ = ["gramians"]

_SMITH_MAX_ITERS = 64


def _mh(X: torch.Tensor) -> torch.Tensor:
    """Conjugate transpose of the last two dims."""
    return X.transpose(-2, -1).conj()


def _diagonal_gramians(
    lam: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    lam_c = lam.conj()
    P = (B @ _mh(B)) / (1 - lam[..., :, None] * lam_c[..., None, :])
    Q = (_mh(C) @ C) / (1 - lam_c[..., :, None] * lam[..., None, :])
    return P, Q


def _smith(A: torch.Tensor, W: torch.Tensor, name: str) -> torch.Tensor:
    """Solve ``A X A^H - X + W = 0`` by Smith doubling; raises if it does not converge."""
    tol = 4 * torch.finfo(torch.float64).eps
    X, Ak = W, A
    for _ in range(_SMITH_MAX_ITERS):
        inc = Ak @ X @ _mh(Ak)
        X = X + inc
        with torch.no_grad():
            inc_norm = torch.linalg.matrix_norm(inc.detach()).flatten()
            x_norm = torch.linalg.matrix_norm(X.detach()).flatten()
            if not bool(torch.isfinite(x_norm).all()):
                break
            done = bool((inc_norm <= tol * x_norm).all())
        if done:
            return (X + _mh(X)) / 2
        Ak = Ak @ Ak
    raise InvalidSystemError(
        f"the Smith iteration for the {name} Gramian did not converge in {_SMITH_MAX_ITERS} doublings; "
        "A is numerically unstable (|lambda| too close to 1) or far from normal"
    )


def gramians(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    diagonal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Controllability and observability Gramians ``(P, Q)`` of a stable discrete LTI system.

    Args:
        A: ``(..., n)`` diagonal of ``A`` (eigenvalues ``lambda``) or dense ``(..., n, n)``.
        B: ``(..., n, m)`` input matrix.
        C: ``(..., p, n)`` output matrix. Leading dims of ``A``, ``B``, ``C`` broadcast.
        diagonal: layout of ``A``; ``None`` infers it (``A.ndim == B.ndim - 1`` means diagonal,
            ``A.ndim == B.ndim`` dense). Pass it when batch dims are broadcast.

    Returns:
        ``P, Q``: ``(..., n, n)`` Hermitian positive semi-definite, complex128 if any input is
        complex, else float64. Differentiable with respect to ``A``, ``B``, ``C``.

    Raises:
        InvalidSystemError: shapes do not match, or an entry is NaN/Inf.
        UnstableSystemError: some ``|lambda(A)| >= 1``.
    """
    A, B, C, diagonal = canonical_system(A, B, C, diagonal=diagonal)
    check_stable(A, diagonal)
    return _gramians(A, B, C, diagonal)


def _gramians(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gramians` on inputs that :func:`canonical_system` and :func:`check_stable` accepted."""
    if diagonal:
        return _diagonal_gramians(A, B, C)
    P = _smith(A, B @ _mh(B), "controllability")
    Q = _smith(_mh(A), _mh(C) @ C, "observability")
    return P, Q
