"""Re-diagonalization of a reduced dense system (paper Sec. 3; Forgione et al. 2024, Sec. 4.1).

After balanced truncation the reduced ``A_r`` is dense. A diagonal layer (LRU) needs it back in
modal form: ``A_r = V diag(lambda) V^-1``, ``B' = V^-1 B_r``, ``C' = C_r V``. The transfer function
``C' (zI - diag(lambda))^-1 B' = C_r (zI - A_r)^-1 B_r`` is unchanged, except where an eigenvalue has
to be moved to stay representable as LRU parameters ``lambda = exp(-exp(nu) + i exp(theta))``:

* **modulus** -- ``|lambda|`` is clamped into ``[min_modulus, max_modulus]`` (``nu = log(-log|lambda|)``
  needs ``0 < |lambda| < 1``); the phase is kept. These are the ``num_clamped`` clamps.
* **phase** -- ``exp(theta)`` must be a positive finite number, so the phase is reported in
  ``[0, 2 pi)`` (``angle mod 2 pi``; a negative angle ``-phi`` is the same eigenvalue at ``2 pi - phi``)
  and a phase below ``min_phase`` (a real positive eigenvalue) is raised to ``min_phase``, which moves
  ``lambda`` by at most ``|lambda| * min_phase``. These are the ``num_phase_adjusted`` changes.

Conjugate pairs are **not** folded: the caller gets all ``r`` eigenvalues of the complex system, with
the same transfer function as the input. For a real input system the eigenvalues come in conjugate
pairs (phases ``phi`` and ``2 pi - phi``) and ``C' x'`` is real; a layer that outputs ``Re(C x)`` (LRU)
therefore reproduces a real system exactly, and reproduces ``Re`` of a complex system's output, the
convention under which the complex Gramians were computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import canonical_system, check_fraction
from .errors import InvalidSystemError

__all__ = ["DiagonalSystem", "rediagonalize"]


@dataclass
class DiagonalSystem:
    """A diagonal (modal) system ``x[k+1] = diag(A) x[k] + B u[k]``, ``y[k] = C x[k]``.

    Attributes:
        A: ``(..., r)`` complex128 eigenvalues, ``min_modulus <= |lambda| <= max_modulus``, sorted by
            descending modulus, ``angle(A) mod 2 pi >= min_phase``.
        B: ``(..., r, m)`` complex128, ``V^-1 B``.
        C: ``(..., p, r)`` complex128, ``C V``.
        num_clamped: how many eigenvalue moduli were clamped (over the whole batch).
        num_phase_adjusted: how many phases were raised to ``min_phase``.
        eigvec_cond: largest 2-norm condition number of the eigenvector matrix ``V`` (large values mean
            a nearly defective ``A`` and an inaccurate ``B``, ``C``).
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    num_clamped: int
    num_phase_adjusted: int = 0
    eigvec_cond: float = 1.0


def rediagonalize(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    max_modulus: float = 1 - 1e-6,
    *,
    min_modulus: float = 1e-12,
    min_phase: float = 1e-8,
) -> DiagonalSystem:
    """Eigendecompose a dense system into diagonal form with LRU-representable eigenvalues.

    Args:
        A: ``(..., r, r)`` dense, real or complex (finite; need not be exactly stable, the clamp
            takes care of round-off).
        B: ``(..., r, m)``.
        C: ``(..., p, r)``.
        max_modulus: upper clamp for ``|lambda|``, in ``(0, 1)``.
        min_modulus: lower clamp for ``|lambda|``, in ``(0, max_modulus)``.
        min_phase: smallest phase in radians, in ``[0, pi)``.

    Returns:
        :class:`DiagonalSystem` (complex128). See the module docstring for the conventions.

    Raises:
        InvalidSystemError: bad shapes, NaN/Inf, or a numerically defective ``A`` (non-finite result).
        CompreSSMError: a clamp bound outside its range.
    """
    max_modulus = check_fraction("max_modulus", max_modulus, low=0.0, high=1.0, closed="()")
    min_modulus = check_fraction("min_modulus", min_modulus, low=0.0, high=max_modulus, closed="()")
    min_phase = check_fraction("min_phase", min_phase, low=0.0, high=math.pi, closed="[)")
    A, B, C, _ = canonical_system(A, B, C, diagonal=False)
    A, B, C = (t.to(torch.complex128) for t in (A, B, C))

    lam, V = torch.linalg.eig(A)
    order = torch.sort(lam.abs().detach(), dim=-1, descending=True, stable=True).indices
    lam = torch.gather(lam, -1, order)
    V = torch.gather(V, -1, order[..., None, :].expand_as(V))
    B_d = torch.linalg.solve(V, B)
    C_d = C @ V

    modulus = lam.abs()
    phase = torch.remainder(torch.angle(lam), 2 * math.pi)
    bad_modulus = (modulus > max_modulus) | (modulus < min_modulus)
    bad_phase = phase < min_phase
    new_modulus = modulus.clamp(min_modulus, max_modulus)
    new_phase = phase.clamp_min(min_phase)
    moved = torch.polar(new_modulus, new_phase)
    lam = torch.where(bad_modulus | bad_phase, moved, lam)

    for name, t in (("eigenvalues", lam), ("B", B_d), ("C", C_d)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise InvalidSystemError(
                f"re-diagonalization produced non-finite {name}: A {tuple(A.shape)} is numerically "
                "defective (no full set of eigenvectors)"
            )
    with torch.no_grad():
        cond = float(torch.linalg.cond(V.detach()).max()) if V.numel() else 1.0
    return DiagonalSystem(
        A=lam,
        B=B_d,
        C=C_d,
        num_clamped=int(bad_modulus.sum()),
        num_phase_adjusted=int(bad_phase.sum()),
        eigvec_cond=cond,
    )
