"""Input validation shared by the core modules (private).

Every check raises a :class:`~compressm_hf.errors.CompreSSMError` subclass that names the bad value
and what is allowed. The checks run on detached copies and never touch autograd.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .errors import CompreSSMError, InvalidRankError, InvalidSystemError, UnstableSystemError


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def promote_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """complex128 if any tensor is complex, else float64."""
    return torch.complex128 if any(t.is_complex() for t in tensors) else torch.float64


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` must be a real or complex tensor (bool/int tensors are promoted later)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidSystemError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise :class:`InvalidSystemError` if ``t`` holds NaN or Inf."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise InvalidSystemError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/Inf), first at index {idx} "
            f"({_describe(t)}); all entries must be finite"
        )


def canonical_system(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    diagonal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Validate ``(A, B, C)`` and return float64/complex128 copies broadcast to common batch dims.

    ``diagonal=None`` infers the layout: ``A.ndim == B.ndim - 1`` means ``A`` is the diagonal
    ``(..., n)``; ``A.ndim == B.ndim`` means dense ``(..., n, n)``. Anything else needs an explicit
    ``diagonal``. Does not check stability (see :func:`check_stable`).
    """
    for name, t in (("A", A), ("B", B), ("C", C)):
        check_tensor(name, t)
    if B.ndim < 2 or C.ndim < 2:
        raise InvalidSystemError(
            f"B must be (..., n, m) and C (..., p, n); got B {tuple(B.shape)} and C {tuple(C.shape)}"
        )
    if diagonal is None:
        if A.ndim == B.ndim - 1:
            diagonal = True
        elif A.ndim == B.ndim:
            diagonal = False
        else:
            raise InvalidSystemError(
                f"cannot tell whether A {tuple(A.shape)} is diagonal (..., n) or dense (..., n, n) "
                f"next to B {tuple(B.shape)}; pass diagonal=True or diagonal=False"
            )
    if A.ndim < (1 if diagonal else 2):
        raise InvalidSystemError(f"A must be (..., n) or (..., n, n), got shape {tuple(A.shape)}")
    n = int(A.shape[-1])
    if n < 1:
        raise InvalidSystemError(f"the state size n = A.shape[-1] must be >= 1, got {n}")
    if not diagonal and A.shape[-2] != n:
        raise InvalidSystemError(f"dense A must be square (..., n, n), got shape {tuple(A.shape)}")
    if B.shape[-2] != n:
        raise InvalidSystemError(f"B must be (..., n={n}, m), got shape {tuple(B.shape)}")
    if C.shape[-1] != n:
        raise InvalidSystemError(f"C must be (..., p, n={n}), got shape {tuple(C.shape)}")
    a_batch = A.shape[:-1] if diagonal else A.shape[:-2]
    try:
        batch = torch.broadcast_shapes(a_batch, B.shape[:-2], C.shape[:-2])
    except RuntimeError:
        raise InvalidSystemError(
            f"leading (batch) dims of A {tuple(A.shape)}, B {tuple(B.shape)} and C {tuple(C.shape)} "
            "do not broadcast"
        ) from None
    for name, t in (("A", A), ("B", B), ("C", C)):
        if t.dtype == torch.bool:
            raise InvalidSystemError(f"{name} must be a real or complex tensor, got dtype {t.dtype}")
    for name, t in (("A", A), ("B", B), ("C", C)):
        check_finite(name, t)
    dtype = promote_dtype(A, B, C)
    A = A.to(dtype).expand(*batch, *A.shape[-1 if diagonal else -2 :])
    B = B.to(dtype).expand(*batch, *B.shape[-2:])
    C = C.to(dtype).expand(*batch, *C.shape[-2:])
    return A, B, C, diagonal


def check_stable(A: torch.Tensor, diagonal: bool) -> None:
    """Raise :class:`UnstableSystemError` if some eigenvalue of ``A`` has ``|lambda| >= 1``."""
    with torch.no_grad():
        lam = A.detach() if diagonal else torch.linalg.eigvals(A.detach())
        modulus = lam.abs()
    if modulus.numel() == 0:
        return
    worst = float(modulus.max())
    if not worst < 1.0:
        idx = tuple(int(i) for i in (modulus == modulus.max()).nonzero()[0])
        where = "A" if diagonal else "eigenvalue of A"
        raise UnstableSystemError(
            f"{where} at index {idx} has |lambda| = {worst!r}; the discrete Gramians exist only for "
            "stable systems with every |lambda| < 1"
        )


def check_rank(rank: object, n: int, name: str = "rank") -> int:
    """``rank`` must be an integer in ``[1, n]``."""
    if isinstance(rank, torch.Tensor) and rank.numel() == 1 and not rank.is_floating_point():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, Integral):
        raise InvalidRankError(f"{name} must be an int in [1, {n}], got {rank!r}")
    if not 1 <= int(rank) <= n:
        raise InvalidRankError(f"{name} must be in [1, n={n}], got {rank}")
    return int(rank)


def check_fraction(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    closed: str,
    error: type[CompreSSMError] = CompreSSMError,
) -> float:
    """``value`` must be a real number in the interval given by ``closed`` ('[)', '(]', '()', '[]')."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise error(f"{name} must be a real number in {closed[0]}{low}, {high}{closed[1]}, got {value!r}")
    v = float(value)
    ok_low = v >= low if closed[0] == "[" else v > low
    ok_high = v <= high if closed[1] == "]" else v < high
    if not (ok_low and ok_high):
        raise error(f"{name} must be in {closed[0]}{low}, {high}{closed[1]}, got {value!r}")
    return v
