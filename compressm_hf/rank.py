"""Choosing how many states to keep (paper Eq. 8 and the 5% gate, Sec. 3.1).

* :func:`select_rank` -- the tolerance rule on cumulative Hankel energy ``sum(sigma)`` (not ``sigma^2``).
* :func:`apply_gate` -- a block is reduced only if the new rank is below ``gate * n``.
* :func:`round_rank` -- round a rank up to a kernel-friendly multiple.
* :func:`select_states` -- which states to keep (largest / smallest / random scores).
* :class:`RankPolicy` -- all of the above as one validated record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch

from ._checks import check_fraction, check_rank
from .errors import CompreSSMError, InvalidRankError, InvalidToleranceError

__all__ = ["RankPolicy", "apply_gate", "round_rank", "select_rank", "select_states"]

SELECTIONS = ("largest", "smallest", "random")
MODES = ("tolerance", "fixed")


def _check_tau(tau: object) -> float:
    return check_fraction("tau", tau, low=0.0, high=1.0, closed="[)", error=InvalidToleranceError)


def _check_scores(name: str, scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise CompreSSMError(f"{name} must be a torch.Tensor of shape (..., n), got {type(scores).__name__}")
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise CompreSSMError(f"{name} must have shape (..., n) with n >= 1, got {tuple(scores.shape)}")
    if scores.is_complex():
        raise CompreSSMError(f"{name} must be real, got dtype {scores.dtype}")
    s = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise CompreSSMError(f"{name} contains NaN/Inf; all values must be finite and >= 0")
    if bool((s < 0).any()):
        raise CompreSSMError(f"{name} must be >= 0, got a minimum of {float(s.min())!r}")
    return s


def select_rank(hsv: torch.Tensor, tau: float) -> int | torch.Tensor:
    """Smallest ``r`` with ``sum_{i<=r} sigma_i >= (1 - tau) * sum_i sigma_i`` (paper Eq. 8).

    Args:
        hsv: ``(..., n)`` non-negative Hankel singular values (or importance scores). They are sorted
            descending here, so any order is accepted.
        tau: the *discarded* fraction of the Hankel energy ``sum(sigma)``, in ``[0, 1)``.
            ``tau = 0`` keeps every non-zero value.

    Returns:
        ``int`` in ``[1, n]`` for a 1-D input, else an int64 tensor of shape ``(...)``.
        An all-zero spectrum gives ``1``.

    Raises:
        InvalidToleranceError: ``tau`` outside ``[0, 1)``.
        CompreSSMError: ``hsv`` is not a real tensor of finite non-negative values.
    """
    tau = _check_tau(tau)
    s = _check_scores("hsv", hsv)
    s = torch.sort(s, dim=-1, descending=True).values
    cum = torch.cumsum(s, dim=-1)
    target = (1.0 - tau) * cum[..., -1:]
    rank = ((cum < target).sum(-1) + 1).clamp(max=s.shape[-1])
    return int(rank) if s.ndim == 1 else rank.to(torch.int64)


def apply_gate(rank: int, n: int, gate: float = 0.95) -> bool:
    """Whether a cut from ``n`` to ``rank`` states is made: only when ``rank < gate * n``.

    Raises:
        InvalidRankError: ``rank`` outside ``[1, n]``.
        CompreSSMError: ``gate`` outside ``(0, 1]``.
    """
    gate = check_fraction("gate", gate, low=0.0, high=1.0, closed="(]")
    rank = check_rank(rank, n)
    return rank < gate * n


def round_rank(rank: int, multiple_of: int, n: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple_of``, capped at ``n``.

    Raises:
        InvalidRankError: ``rank`` outside ``[1, n]``, or ``multiple_of < 1``.
    """
    rank = check_rank(rank, n)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, Integral) or multiple_of < 1:
        raise InvalidRankError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
    return min(n, math.ceil(rank / int(multiple_of)) * int(multiple_of))


def select_states(
    scores: torch.Tensor,
    rank: int,
    selection: str = "largest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the ``rank`` states to keep, sorted ascending.

    Args:
        scores: ``(n,)`` per-state importance (ties are broken by the lower index).
        rank: how many to keep, in ``[1, n]``.
        selection: ``"largest"`` (the paper's default), ``"smallest"`` (the ablation that truncates
            the top states) or ``"random"`` (uniform without replacement, from ``generator``).
        generator: optional ``torch.Generator`` (CPU) for ``"random"``.

    Returns:
        ``(rank,)`` int64 indices into ``scores``, sorted ascending.
    """
    s = _check_scores("scores", scores)
    if s.ndim != 1:
        raise CompreSSMError(f"scores must be 1-D (n,), got shape {tuple(scores.shape)}")
    n = s.shape[0]
    rank = check_rank(rank, n)
    if selection == "random":
        idx = torch.randperm(n, generator=generator)[:rank].to(s.device)
    elif selection in ("largest", "smallest"):
        order = torch.sort(s, descending=selection == "largest", stable=True).indices
        idx = order[:rank]
    else:
        raise CompreSSMError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return torch.sort(idx.to(torch.int64)).values


@dataclass
class RankPolicy:
    """How a layer's new rank is chosen.

    Attributes:
        tau: discarded fraction of ``sum(sigma)`` in ``[0, 1)`` (``mode="tolerance"``).
        mode: ``"tolerance"`` (paper Eq. 8) or ``"fixed"``: ``r = max(1, floor((1 - fixed_fraction) * n))``.
        gate: reduce only if ``r < gate * n``; in ``(0, 1]`` (paper: 0.95).
        min_rank: never go below this many states (``>= 1``).
        multiple_of: round ``r`` up to a multiple of this (``>= 1``), capped at ``n``.
        selection: ``"largest"``, ``"smallest"`` or ``"random"`` (paper App. C.1 ablations).
        fixed_fraction: fraction cut per attempt in ``mode="fixed"``, in ``(0, 1)``.
    """

    tau: float
    mode: str = "tolerance"
    gate: float = 0.95
    min_rank: int = 1
    multiple_of: int = 1
    selection: str = "largest"
    fixed_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.tau = _check_tau(self.tau)
        if self.mode not in MODES:
            raise CompreSSMError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.gate = check_fraction("gate", self.gate, low=0.0, high=1.0, closed="(]")
        for name in ("min_rank", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise InvalidRankError(f"{name} must be an int >= 1, got {value!r}")
            setattr(self, name, int(value))
        if self.selection not in SELECTIONS:
            raise CompreSSMError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        self.fixed_fraction = check_fraction(
            "fixed_fraction", self.fixed_fraction, low=0.0, high=1.0, closed="()"
        )
