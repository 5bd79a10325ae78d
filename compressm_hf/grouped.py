"""Reduction of grouped dense systems (Mamba-2): per-head HSVs, one rank per layer, one keep set per group.

A Mamba-2 layer has ``G`` groups of ``R`` heads. Every head is a system over its group's ``n`` states with a
*dense* averaged surrogate (``A = a I`` for its scalar decay, ``B`` and ``C`` factors of second-moment
matrices), so the state directions are not decoupled and the Gramians are full ``n x n`` matrices. The
layer cannot absorb a balancing rotation (its depthwise ``conv1d`` and SiLU act on each B/C channel
separately), so it keeps a *subset* of each group's state channels:

1. per head: Gramians ``P, Q`` (:func:`~compressm_hf.gramians`) and HSVs ``sigma`` (:func:`~compressm_hf.hankel_singular_values`);
2. the layer spectrum: the heads' sorted HSVs summed position-wise over all ``G R`` heads, ``(n,)``;
3. the rank: the tolerance rule (or fixed fraction), ``min_rank`` and rounding, then the gate -- as for
   every other layer (``planning._choose_rank``, :func:`~compressm_hf.apply_gate`);
4. per group: the ``rank`` states with the largest Hankel importance ``sqrt(P_ii Q_ii)`` summed over the
   group's heads (or the smallest / random ones, the ablations);
5. energies: *promised* = the spectrum's leading ``rank`` share (what balanced truncation would keep), and
   *kept* = the HSV sum of the kept-subset systems over that of the full systems. With ``A = a I`` the
   kept subsystem's Gramians are exactly the principal submatrices, so *kept* is exact for the surrogate.
   ``error_bound`` is ``2 * sum`` of the discarded spectrum (the balanced-truncation bound of the promised
   cut); it is not a bound for a subset truncation, which ``extra["error_bound_applies"] = False`` records.

Systems: ``A`` ``(G, R, n, n)``, ``B`` ``(G, R, n, m)``, ``C`` ``(G, R, p, n)`` (``LTISystem`` with
``diagonal=False`` and ``reduction="grouped"``). Plans: ``rule="modal"`` (original states are kept) and
``keep`` ``(G, rank)`` int64, each row sorted ascending.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidSystemError
from .gramians import gramians
from .hankel import hankel_singular_values
from .planning import _choose_rank
from .protocol import LTISystem, ReductionPlan
from .rank import RankPolicy, apply_gate, select_states

__all__ = ["grouped_rank_scores", "plan_grouped_reduction"]


def _validated(system: LTISystem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(system, LTISystem):
        raise InvalidSystemError(f"system must be an LTISystem, got {type(system).__name__}")
    A, B, C = system.A, system.B, system.C
    if system.diagonal or A.ndim != 4 or A.shape[-1] != A.shape[-2]:
        raise InvalidSystemError(
            f"a grouped system needs a dense A of shape (groups, heads_per_group, n, n) and diagonal=False, got "
            f"A {tuple(A.shape)} with diagonal={system.diagonal}"
        )
    n = A.shape[-1]
    if (
        B.ndim != 4
        or C.ndim != 4
        or B.shape[:3] != A.shape[:3]
        or C.shape[:2] != A.shape[:2]
        or C.shape[3] != n
    ):
        raise InvalidSystemError(
            f"grouped system shapes do not fit: A {tuple(A.shape)}, B {tuple(B.shape)} (need (G, R, n, m)), "
            f"C {tuple(C.shape)} (need (G, R, p, n))"
        )
    return A, B, C


def grouped_rank_scores(system: LTISystem) -> torch.Tensor:
    """The layer spectrum the rank rule is applied to: ``(n,)`` float64, descending.

    The sorted HSVs of every head, summed position-wise over all heads (so :func:`compressm_hf.planning.planned_size`
    on it gives the rank :func:`plan_grouped_reduction` picks).
    """
    A, B, C = _validated(system)
    with torch.no_grad():
        return hankel_singular_values(A, B, C, diagonal=False).sum(dim=(0, 1))


def plan_grouped_reduction(
    system: LTISystem, policy: RankPolicy, generator: torch.Generator | None = None
) -> ReductionPlan | None:
    """Decide whether and how to shrink one grouped layer (see the module docstring for the rule).

    Args:
        system: ``LTISystem`` with ``A`` ``(G, R, n, n)``, ``B`` ``(G, R, n, m)``, ``C`` ``(G, R, p, n)``.
        policy: the :class:`~compressm_hf.RankPolicy`.
        generator: ``torch.Generator`` for ``selection="random"``.

    Returns:
        ``ReductionPlan`` (``rule="modal"``, ``keep`` ``(G, rank)``, ``energy_kept`` of the kept subset,
        ``extra["energy_promised"]``), or ``None`` when the gate refuses.

    Raises:
        InvalidSystemError: wrong shapes, NaN/Inf; UnstableSystemError: a decay ``|a| >= 1``.
    """
    if not isinstance(policy, RankPolicy):
        raise InvalidSystemError(f"policy must be a RankPolicy, got {type(policy).__name__}")
    A, B, C = _validated(system)
    G, R, n = A.shape[0], A.shape[1], A.shape[-1]
    with torch.no_grad():
        hsv = hankel_singular_values(A, B, C, diagonal=False)  # (G, R, n), descending per head
        spectrum = hsv.sum(dim=(0, 1))
        rank, raw = _choose_rank(spectrum, policy)
        if not apply_gate(rank, n, policy.gate):
            return None
        P, Q = gramians(A, B, C, diagonal=False)
        importance = (
            (torch.diagonal(P, dim1=-2, dim2=-1).real * torch.diagonal(Q, dim1=-2, dim2=-1).real)
            .clamp(min=0.0)
            .sqrt()
            .sum(dim=1)
        )  # (G, n): summed over the group's heads
        keep = torch.stack(
            [select_states(importance[g], rank, policy.selection, generator) for g in range(G)]
        )
        idx = keep[:, None, :].expand(G, R, rank)
        A_k = A.gather(-2, idx[..., :, None].expand(G, R, rank, n)).gather(
            -1, idx[..., None, :].expand(G, R, rank, rank)
        )
        B_k = B.gather(-2, idx[..., None].expand(G, R, rank, B.shape[-1]))
        C_k = C.gather(-1, idx[..., None, :].expand(G, R, C.shape[-2], rank))
        kept_hsv = hankel_singular_values(A_k, B_k, C_k, diagonal=False)
        total = float(hsv.sum())
        promised = float(spectrum[:rank].sum()) / total if total > 0 else 1.0
        kept = float(kept_hsv.sum()) / total if total > 0 else 1.0
    return ReductionPlan(
        n=n,
        rank=rank,
        hsv=spectrum,
        energy_kept=kept,
        error_bound=float(2 * spectrum[rank:].sum()),
        rule="modal",
        selection=policy.selection,
        keep=keep,
        diagonal=None,
        extra={
            "rule_rank": raw,
            "energy_promised": promised,
            "energy_kept_subset": kept,
            "error_bound_applies": False,
            "num_groups": G,
            "heads_per_group": R,
            "num_channels": math.prod(A.shape[:2]),
        },
    )
