"""The whole reduction decision for one layer: :func:`plan_reduction`.

``system.reduction == "balanced"`` (LRU; one MIMO system, no batch dims)
    Hankel singular values -> rank (tolerance rule or fixed fraction, ``min_rank``, rounding) ->
    5% gate -> ``largest``: balanced truncation to the leading ``r`` coordinates; ``smallest``: to the
    trailing ``r``; both re-diagonalized (``plan.diagonal``). ``random``: a random subset of the
    *original* diagonal states (modal truncation, ``plan.keep``; paper App. C.1), at the same rank;
    its ``energy_kept`` and ``error_bound`` use the modal importances of the states (``2 * sum`` of the
    discarded ones is a rigorous H-infinity bound for modal truncation), ``plan.hsv`` stays the HSVs.

``system.reduction == "modal"`` (Mamba; ``A`` ``(..., n)`` with leading dims, e.g. one SISO system per
channel, all sharing the state index)
    per-state importance ``sqrt(P_ii Q_ii)`` (:func:`~compressm_hf.modal_importance`) **summed** over
    the leading dims (no per-channel normalization: channels with more Hankel energy weigh more, and
    ``2 * sum`` of the discarded aggregate scores stays a rigorous bound on the summed per-channel
    H-infinity errors of the exact LTI system) -> the tolerance rule on the sorted scores -> same
    rank policy and gate -> one shared keep set (``plan.keep``).
"""

from __future__ import annotations

import math

import torch

from ._checks import canonical_system, check_stable
from .diagonal import rediagonalize
from .errors import InvalidSystemError
from .hankel import DEFAULT_JITTER
from .protocol import LTISystem, ReductionPlan
from .rank import RankPolicy, _check_scores, apply_gate, round_rank, select_rank, select_states
from .truncation import _balance, _truncate, modal_importance, modal_truncation

__all__ = ["plan_reduction", "planned_size", "rank_scores"]


def _choose_rank(sorted_scores: torch.Tensor, policy: RankPolicy) -> tuple[int, int]:
    """(rank after min_rank and rounding, the raw rank of the rule)."""
    n = sorted_scores.shape[-1]
    if policy.mode == "fixed":
        raw = max(1, math.floor((1 - policy.fixed_fraction) * n))
    else:
        raw = select_rank(sorted_scores, policy.tau)
    rank = min(n, max(raw, policy.min_rank))
    return round_rank(rank, policy.multiple_of, n), raw


def planned_size(scores: torch.Tensor, policy: RankPolicy) -> int:
    """The state size a layer has after one attempt of :func:`plan_reduction` with ``policy``.

    The same decision as :func:`plan_reduction`, on the scores alone: the rank of the rule (tolerance
    or fixed fraction), raised to ``policy.min_rank``, rounded up to ``policy.multiple_of``; ``n``
    itself when the gate refuses the cut (``rank >= policy.gate * n``).

    Args:
        scores: ``(n,)`` real non-negative scores the rule ranks on, as :func:`rank_scores` returns
            them (any order).
        policy: the :class:`~compressm_hf.RankPolicy`.

    Returns:
        ``int`` in ``[1, n]``.
    """
    scores = _check_scores("scores", scores)
    if scores.ndim != 1:
        raise InvalidSystemError(f"scores must be 1-D (n,), got shape {tuple(scores.shape)}")
    ranked = torch.sort(scores, descending=True).values
    rank, _ = _choose_rank(ranked, policy)
    return rank if apply_gate(rank, ranked.shape[-1], policy.gate) else int(ranked.shape[-1])


def rank_scores(system: LTISystem) -> torch.Tensor:
    """The scores :func:`plan_reduction` applies the rank rule to, sorted descending.

    ``"balanced"`` systems: the Hankel singular values; ``"modal"`` systems: the per-state importance
    ``sqrt(P_ii Q_ii)`` summed over the leading (channel) dims. Feeding them to :func:`planned_size`
    gives exactly the rank :func:`plan_reduction` picks for the same system and policy.

    Args:
        system: the layer's :class:`~compressm_hf.LTISystem` (validated like in :func:`plan_reduction`).

    Returns:
        ``(n,)`` float64, descending, non-negative.

    Raises:
        InvalidSystemError / UnstableSystemError: as :func:`plan_reduction`.
    """
    if getattr(system, "reduction", None) == "grouped":  # Mamba-2: see compressm_hf.grouped
        from .grouped import grouped_rank_scores

        return grouped_rank_scores(system)
    A, B, C = _validated(system)
    with torch.no_grad():
        if system.reduction == "modal":
            return _modal_scores(A, B, C)[1]
        return _balance(A, B, C, bool(system.diagonal), DEFAULT_JITTER)[0].to(torch.float64)


def _modal_scores(A, B, C) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-state scores summed over channels ``(n,)``, the same sorted descending)."""
    scores = modal_importance(A, B, C).reshape(-1, A.shape[-1]).sum(0)
    return scores, torch.sort(scores, descending=True).values


def _validated(system: LTISystem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(system, LTISystem):
        raise InvalidSystemError(f"system must be an LTISystem, got {type(system).__name__}")
    if system.reduction not in ("balanced", "modal"):
        raise InvalidSystemError(f"system.reduction must be 'balanced' or 'modal', got {system.reduction!r}")
    A, B, C, diagonal = canonical_system(system.A, system.B, system.C, diagonal=bool(system.diagonal))
    check_stable(A, diagonal)
    if system.reduction == "balanced" and A.ndim != (1 if diagonal else 2):
        raise InvalidSystemError(
            "a 'balanced' system must be a single system without batch dims (A (n,) or (n, n)), "
            f"got A {tuple(A.shape)}; use reduction='modal' for one system per channel"
        )
    if system.reduction == "modal" and not diagonal:
        raise InvalidSystemError("a 'modal' system must be diagonal (system.diagonal=True)")
    return A, B, C


def _as_float(x: torch.Tensor) -> float:
    return float(x.detach())


def plan_reduction(
    system: LTISystem, policy: RankPolicy, generator: torch.Generator | None = None
) -> ReductionPlan | None:
    """Decide whether and how to shrink one layer.

    Args:
        system: the layer's :class:`~compressm_hf.LTISystem` (validated before any math).
        policy: the :class:`~compressm_hf.RankPolicy`.
        generator: ``torch.Generator`` for ``selection="random"``.

    Returns:
        A :class:`~compressm_hf.ReductionPlan`, or ``None`` when the gate refuses
        (``rank >= policy.gate * n``, which includes ``rank == n``).

    Raises:
        InvalidSystemError: not an ``LTISystem``, bad shapes, NaN/Inf, a batched ``"balanced"``
            system, a dense ``"modal"`` system, or ``selection="random"`` on a dense system.
        UnstableSystemError: ``|lambda| >= 1``.
    """
    if not isinstance(policy, RankPolicy):
        raise InvalidSystemError(f"policy must be a RankPolicy, got {type(policy).__name__}")
    if getattr(system, "reduction", None) == "grouped":  # Mamba-2: see compressm_hf.grouped
        from .grouped import plan_grouped_reduction

        return plan_grouped_reduction(system, policy, generator)
    A, B, C = _validated(system)
    if policy.selection == "random" and system.reduction == "balanced" and not system.diagonal:
        raise InvalidSystemError("selection='random' keeps original diagonal states; A must be diagonal")
    n = A.shape[-1]
    with torch.no_grad():
        if system.reduction == "modal":
            return _plan_modal(A, B, C, n, policy, generator)
        return _plan_balanced(A, B, C, bool(system.diagonal), n, policy, generator)


def _plan_modal(A, B, C, n, policy, generator) -> ReductionPlan | None:
    scores, ranked = _modal_scores(A, B, C)
    rank, raw = _choose_rank(ranked, policy)
    if not apply_gate(rank, n, policy.gate):
        return None
    keep = select_states(scores, rank, policy.selection, generator)
    total = scores.sum()
    kept = scores[keep].sum()
    return ReductionPlan(
        n=n,
        rank=rank,
        hsv=ranked,
        energy_kept=_as_float(kept / total) if total > 0 else 1.0,
        error_bound=_as_float(2 * (total - kept)),
        rule="modal",
        selection=policy.selection,
        keep=keep,
        diagonal=None,
        extra={"rule_rank": raw, "num_channels": math.prod(A.shape[:-1])},
    )


def _plan_balanced(A, B, C, diagonal, n, policy, generator) -> ReductionPlan | None:
    balance = _balance(A, B, C, diagonal, DEFAULT_JITTER)
    hsv = balance[0]
    rank, raw = _choose_rank(hsv, policy)
    if not apply_gate(rank, n, policy.gate):
        return None
    extra: dict = {"rule_rank": raw}
    total = hsv.sum()
    if policy.selection == "random":
        scores = modal_importance(A, B, C)
        keep = select_states(scores, rank, "random", generator)
        A_k, B_k, C_k = modal_truncation(A, B, C, keep)
        modal_total = scores.sum()
        kept = scores[keep].sum()
        extra.update(energy_basis="modal_importance", num_clamped=0)
        return ReductionPlan(
            n=n,
            rank=rank,
            hsv=hsv,
            energy_kept=_as_float(kept / modal_total) if modal_total > 0 else 1.0,
            error_bound=_as_float(2 * (modal_total - kept)),
            rule="balanced",
            selection="random",
            keep=keep,
            diagonal=LTISystem(
                A=A_k.to(torch.complex128),
                B=B_k.to(torch.complex128),
                C=C_k.to(torch.complex128),
                diagonal=True,
                reduction="balanced",
            ),
            extra=extra,
        )
    coords = torch.arange(rank) if policy.selection == "largest" else torch.arange(n - rank, n)
    coords = coords.to(hsv.device)
    bt = _truncate(A, B, C, diagonal, balance, coords)
    d = rediagonalize(bt.A, bt.B, bt.C)
    extra.update(
        num_clamped=d.num_clamped, num_phase_adjusted=d.num_phase_adjusted, eigvec_cond=d.eigvec_cond
    )
    return ReductionPlan(
        n=n,
        rank=rank,
        hsv=hsv,
        energy_kept=_as_float(hsv[coords].sum() / total) if total > 0 else 1.0,
        error_bound=_as_float(bt.error_bound),
        rule="balanced",
        selection=policy.selection,
        keep=None,
        diagonal=LTISystem(A=d.A, B=d.B, C=d.C, diagonal=True, reduction="balanced"),
        extra=extra,
    )
