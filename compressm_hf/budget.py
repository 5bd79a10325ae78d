"""A global state budget: the ``tau`` that brings the total state size of all layers to a target.

The paper's rule (Eq. 8) is per layer: each layer keeps the smallest rank holding ``1 - tau`` of its
``sum(sigma)``. A *budget* ``B`` asks instead for a total state size across layers, e.g. to compare
CompreSSM with a baseline at exactly the same size. :func:`tau_for_budget` finds the one ``tau`` (shared
by every layer, so the layers still split the budget by their Hankel spectra) that meets it.

What "meets" means
------------------
With the full per-layer decision of :func:`~compressm_hf.planning.plan_reduction` (rule -> ``min_rank``
-> rounding up to ``multiple_of`` -> the gate, under which a layer keeps all ``n`` states unless its new
rank is ``< gate * n``), the total ``T(tau) = sum_i size_i(tau)`` is a non-increasing step function of
``tau``. :func:`tau_for_budget` returns **the least compression that fits**: the first interval of ``tau``
on which ``T(tau) <= B``, i.e. the largest reachable total that is ``<= B``. The budget is a cap and is
never exceeded when it is reachable. ``T(tau) == B`` exactly is not always possible: the gate makes a
layer jump from ``n`` to below ``0.95 n``, rounding moves in multiples, and one breakpoint of ``tau``
can move several layers at once; the result then lies below ``B`` (by less than the smallest such jump).

A budget is *unreachable* when ``B`` is below :func:`minimum_total` (every layer at
``round_up(max(1, min_rank))``, or at ``n`` if even that cut is refused by the gate); this does not depend
on the spectra. Then :func:`tau_for_budget` raises :class:`UnreachableBudgetError`, or, with
``on_unreachable="closest"``, returns the strongest compression the policy allows with ``met=False``.

How it is exact
---------------
Layer ``i`` with sorted scores ``s`` and sum ``S`` has rank ``<= k`` exactly when
``tau >= 1 - cumsum(s)_k / S``; ``T`` only changes at these breakpoints. The search sorts the breakpoints of
all layers and bisects over the intervals between them (``O(log sum n)`` evaluations of the rule), each
evaluated at its midpoint (``0`` for the first one). The returned ``tau`` is that midpoint, so it is robust
to float rounding at the breakpoints, and :func:`~compressm_hf.planning.plan_reduction` with it gives
exactly the returned sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from .errors import CompreSSMError
from .planning import planned_size
from .rank import RankPolicy, _check_scores, apply_gate, round_rank

__all__ = [
    "BUDGET_SCHEDULES",
    "BudgetSolution",
    "UnreachableBudgetError",
    "attempt_targets",
    "budget_from_mean",
    "minimum_total",
    "tau_for_budget",
]

BUDGET_SCHEDULES = ("geometric", "direct")
UNREACHABLE_ACTIONS = ("raise", "closest")


class UnreachableBudgetError(CompreSSMError):
    """The state budget is below the smallest total the rank policy allows (``min_rank``, rounding, gate)."""


@dataclass(frozen=True)
class BudgetSolution:
    """What :func:`tau_for_budget` found.

    Attributes:
        tau: the tolerance to plan with (a point inside ``tau_interval``; ``0.0`` for the first interval).
        tau_interval: ``(low, high)``: every ``tau`` in ``[low, high)`` gives these sizes (up to float
            rounding at the ends); ``low`` is the smallest ``tau`` that meets the budget.
        sizes: per-layer state sizes after the attempt (``n`` for a layer the gate leaves alone).
        total: ``sum(sizes)``.
        budget: the requested total.
        met: ``total <= budget`` (False only with ``on_unreachable="closest"``).
    """

    tau: float
    tau_interval: tuple[float, float]
    sizes: tuple[int, ...]
    total: int
    budget: int
    met: bool

    def to_dict(self) -> dict:
        """A JSON-friendly copy (for the compression report)."""
        return {
            "tau": self.tau,
            "tau_interval": list(self.tau_interval),
            "sizes": list(self.sizes),
            "total": self.total,
            "budget": self.budget,
            "met": self.met,
        }


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise CompreSSMError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_policy(policy: object) -> RankPolicy:
    if not isinstance(policy, RankPolicy):
        raise CompreSSMError(f"policy must be a RankPolicy, got {type(policy).__name__}")
    if policy.mode != "tolerance":
        raise CompreSSMError(
            f"a state budget searches the tolerance rule; policy.mode must be 'tolerance', got {policy.mode!r}"
        )
    return policy


def _floor_size(n: int, policy: RankPolicy) -> int:
    """The smallest size one attempt can give a layer of ``n`` states under ``policy``."""
    rank = round_rank(min(n, max(1, policy.min_rank)), policy.multiple_of, n)
    return rank if apply_gate(rank, n, policy.gate) else n


def minimum_total(sizes: Sequence[int], policy: RankPolicy) -> int:
    """The smallest total state size one attempt can reach from per-layer ``sizes`` (any spectra).

    Each layer goes at most to ``round_up(max(1, policy.min_rank), policy.multiple_of)``, and stays at
    ``n`` when the gate refuses even that cut.

    Raises:
        CompreSSMError: ``sizes`` is not a non-empty list of ints >= 1, or ``policy`` is not a RankPolicy.
    """
    if not isinstance(policy, RankPolicy):
        raise CompreSSMError(f"policy must be a RankPolicy, got {type(policy).__name__}")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise CompreSSMError(f"sizes must be a non-empty sequence of state sizes, got {sizes!r}")
    return sum(_floor_size(_check_int("each state size", n, 1), policy) for n in sizes)


def budget_from_mean(mean: float, num_layers: int) -> int:
    """The total budget of a target *mean* state size: ``floor(mean * num_layers)``, so the mean is ``<= mean``.

    Raises:
        CompreSSMError: ``mean`` not a finite number ``>= 1``, or ``num_layers`` not an int ``>= 1``.
    """
    if isinstance(mean, bool) or not isinstance(mean, Real) or not math.isfinite(mean) or mean < 1:
        raise CompreSSMError(f"the target mean state size must be a finite number >= 1, got {mean!r}")
    num_layers = _check_int("num_layers", num_layers, 1)
    return math.floor(round(float(mean) * num_layers, 9))


def attempt_targets(start_total: int, budget: int, attempts: int, schedule: str = "geometric") -> list[int]:
    """The total each of ``attempts`` attempts aims at; the last one is always ``budget``.

    ``"geometric"`` (the default of the callback): attempt ``k`` of ``K`` aims at
    ``floor(start_total * (budget / start_total) ** (k / K))``, so every attempt removes about the same
    fraction of the states and the model recovers between cuts, as with the paper's repeated
    per-layer rule (4 attempts inside the warm-up); a single cut to a small budget removes most of the
    Hankel energy at once. ``"direct"``: every attempt aims at ``budget`` (the first one cuts all the way;
    later ones only act if an earlier one was skipped or refused). A ``budget >= start_total`` gives
    ``[budget] * attempts`` (nothing to cut).

    Raises:
        CompreSSMError: non-int or non-positive arguments, or an unknown ``schedule``.
    """
    start_total = _check_int("start_total", start_total, 1)
    budget = _check_int("budget", budget, 1)
    attempts = _check_int("attempts", attempts, 1)
    if schedule not in BUDGET_SCHEDULES:
        raise CompreSSMError(f"budget schedule must be one of {BUDGET_SCHEDULES}, got {schedule!r}")
    if schedule == "direct" or budget >= start_total:
        return [budget] * attempts
    ratio = budget / start_total
    targets = [
        max(budget, math.floor(start_total * ratio ** (k / attempts) + 1e-9)) for k in range(1, attempts)
    ]
    return [*targets, budget]


def _breakpoints(spectra: list[torch.Tensor]) -> list[float]:
    """Sorted distinct ``tau`` in ``(0, 1)`` at which some layer's rule rank changes."""
    points = []
    for s in spectra:
        ranked = torch.sort(s, descending=True).values
        total = ranked.sum()
        if float(total) <= 0.0:
            continue  # an all-zero spectrum gives rank 1 at every tau
        b = 1.0 - torch.cumsum(ranked, 0)[:-1] / total
        points.append(b[(b > 0) & (b < 1)])
    if not points:
        return []
    return torch.unique(torch.cat(points)).tolist()  # unique() sorts ascending


def tau_for_budget(
    spectra: Sequence[torch.Tensor],
    budget: int,
    policy: RankPolicy,
    *,
    on_unreachable: str = "raise",
) -> BudgetSolution:
    """The shared ``tau`` whose per-layer sizes give the largest total ``<= budget`` (see the module docstring).

    Args:
        spectra: one ``(n_i,)`` tensor per layer of the non-negative scores the rule ranks on
            (:func:`~compressm_hf.planning.rank_scores`: HSVs, or summed modal importances); ``n_i``
            is the layer's current state size. Any order.
        budget: the target total state size across these layers (int ``>= 1``).
        policy: a :class:`~compressm_hf.RankPolicy` with ``mode="tolerance"``; its ``tau`` is ignored,
            ``gate``, ``min_rank`` and ``multiple_of`` are respected.
        on_unreachable: ``"raise"`` (default) or ``"closest"``: return the strongest compression with
            ``met=False`` when ``budget < minimum_total(...)``.

    Returns:
        A :class:`BudgetSolution`. Planning every layer with ``dataclasses.replace(policy, tau=sol.tau)``
        gives ``sol.sizes``.

    Raises:
        UnreachableBudgetError: ``budget`` is below :func:`minimum_total` (with ``on_unreachable="raise"``).
        CompreSSMError: bad spectra, budget, policy or ``on_unreachable``.
    """
    policy = _check_policy(policy)
    budget = _check_int("budget", budget, 1)
    if on_unreachable not in UNREACHABLE_ACTIONS:
        raise CompreSSMError(f"on_unreachable must be one of {UNREACHABLE_ACTIONS}, got {on_unreachable!r}")
    if isinstance(spectra, torch.Tensor) or not isinstance(spectra, Sequence) or not spectra:
        raise CompreSSMError("spectra must be a non-empty sequence of 1-D score tensors, one per layer")
    checked = []
    for i, s in enumerate(spectra):
        s = _check_scores(f"spectra[{i}]", s)
        if s.ndim != 1:
            raise CompreSSMError(f"spectra[{i}] must be 1-D (n,), got shape {tuple(s.shape)}")
        checked.append(s)

    floor = minimum_total([s.shape[0] for s in checked], policy)
    if budget < floor and on_unreachable == "raise":
        sizes = [int(s.shape[0]) for s in checked]
        raise UnreachableBudgetError(
            f"a state budget of {budget} is unreachable from sizes {sizes}: the smallest total is {floor} "
            f"(min_state_size={policy.min_rank}, round_to={policy.multiple_of}, gate={policy.gate}: no layer goes "
            "below round_to's multiple of min_state_size, and a layer whose cut the gate refuses keeps all its "
            "states); raise the budget or lower min_state_size / round_to"
        )

    points = _breakpoints(checked)
    edges = [0.0, *points, 1.0]
    below_one = math.nextafter(1.0, 0.0)  # a midpoint next to 1 may round up to 1, which no tau may be
    candidates = [0.0] + [min((lo + hi) / 2, below_one) for lo, hi in zip(points, edges[2:])]

    def sizes_at(tau: float) -> tuple[int, ...]:
        at = dataclasses.replace(policy, tau=tau)
        return tuple(planned_size(s, at) for s in checked)

    # first candidate with total <= budget (totals are non-increasing in tau); the last one if none
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(sizes_at(candidates[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    sizes = sizes_at(candidates[lo])
    total = sum(sizes)
    return BudgetSolution(
        tau=float(candidates[lo]),
        tau_interval=(float(edges[lo]), float(edges[lo + 1])),
        sizes=sizes,
        total=total,
        budget=budget,
        met=total <= budget,
    )
