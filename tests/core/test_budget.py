"""The global state budget on hand-made spectra: tau_for_budget, minimum_total, attempt_targets, budget_from_mean."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from compressm_hf import CompreSSMError, LTISystem, RankPolicy, plan_reduction
from compressm_hf.budget import (
    BudgetSolution,
    UnreachableBudgetError,
    attempt_targets,
    budget_from_mean,
    minimum_total,
    tau_for_budget,
)
from compressm_hf.planning import planned_size, rank_scores

from .systems import random_diagonal


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


A_SPEC = t(4, 3, 2, 1)  # S = 10, rank <= k from tau >= 0.6 / 0.3 / 0.1 (k = 1 / 2 / 3)
B_SPEC = t(8, 1, 0.5, 0.5)  # S = 10, rank <= k from tau >= 0.2 / 0.1 / 0.05


@pytest.mark.parametrize(
    ("budget", "sizes", "interval"),
    [
        (8, (4, 4), (0.0, 0.05)),  # already within budget: tau = 0, nothing cut
        (7, (4, 3), (0.05, 0.1)),  # A's rank 4 is refused by the gate, B goes to 3
        (6, (3, 2), (0.1, 0.2)),  # nothing gives exactly 6: the largest total <= 6 is 5
        (5, (3, 2), (0.1, 0.2)),
        (4, (3, 1), (0.2, 0.3)),
        (3, (2, 1), (0.3, 0.6)),
        (2, (1, 1), (0.6, 1.0)),
    ],
)
def test_exact_sizes_on_hand_made_spectra(budget, sizes, interval):
    sol = tau_for_budget([A_SPEC, B_SPEC], budget, RankPolicy(tau=0.0))
    assert isinstance(sol, BudgetSolution)
    assert sol.sizes == sizes and sol.total == sum(sizes) and sol.met and sol.budget == budget
    assert sol.tau_interval == pytest.approx(interval)
    lo, hi = sol.tau_interval
    assert lo <= sol.tau < hi
    # the returned tau reproduces the sizes through the planner's own rule
    at = RankPolicy(tau=sol.tau)
    assert tuple(planned_size(s, at) for s in (A_SPEC, B_SPEC)) == sizes


def test_least_compression_that_fits():
    """Among all taus meeting the budget, the smallest one (largest total) is returned."""
    spectra = [t(5, 4, 3, 2, 1, 0.5), t(9, 2, 1, 1, 0.5, 0.25), t(1, 1, 1, 1, 1, 1)]
    policy = RankPolicy(tau=0.0)
    grid = [i / 1000 for i in range(1000)]
    totals = {
        tau: sum(planned_size(s, dataclasses.replace(policy, tau=tau)) for s in spectra) for tau in grid
    }
    for budget in range(3, 19):
        sol = tau_for_budget(spectra, budget, policy)
        best = max(v for v in totals.values() if v <= budget)
        assert sol.total == best <= budget
        assert all(v > budget for tau, v in totals.items() if tau < sol.tau_interval[0] - 1e-12)


def test_equal_spectra_move_together():
    # both layers change rank at the same taus: totals go 8 -> 6 -> 4 -> 2, so a budget of 5 gives 4
    sol = tau_for_budget([t(1, 1, 1, 1), t(1, 1, 1, 1)], 5, RankPolicy(tau=0.0))
    assert sol.sizes == (2, 2)


def test_gate_refusal_is_accounted_for():
    spectrum = t(*range(20, 0, -1))
    # 19 of 20 states is not < 0.95 * 20: the gate refuses it, so the largest total <= 19 is 18
    assert tau_for_budget([spectrum], 19, RankPolicy(tau=0.0)).sizes == (18,)
    assert tau_for_budget([spectrum], 19, RankPolicy(tau=0.0, gate=1.0)).sizes == (19,)
    # a layer the policy can never cut (min_rank = n) keeps its size; the others carry the cut
    sol = tau_for_budget([t(1, 1, 1, 1), t(4, 3, 2, 1, 1, 1, 1, 1)], 9, RankPolicy(tau=0.0, min_rank=4))
    assert sol.sizes == (4, 5)


def test_rounding_to_multiples():
    spectrum = t(*([1.0] * 16))
    sol = tau_for_budget([spectrum], 10, RankPolicy(tau=0.0, multiple_of=4))
    assert sol.sizes == (8,)
    sol = tau_for_budget([spectrum, spectrum], 21, RankPolicy(tau=0.0, multiple_of=4))
    assert sol.sizes == (8, 8)  # both layers step together in multiples of 4: 24 is over, 16 is the most


def test_unreachable_budget_raises_or_returns_closest():
    spectra = [t(*range(8, 0, -1)), t(*range(8, 0, -1))]
    policy = RankPolicy(tau=0.0, min_rank=3)
    assert minimum_total([8, 8], policy) == 6
    with pytest.raises(UnreachableBudgetError, match=r"budget of 5 is unreachable.*smallest total is 6"):
        tau_for_budget(spectra, 5, policy)
    sol = tau_for_budget(spectra, 5, policy, on_unreachable="closest")
    assert sol.sizes == (3, 3) and not sol.met and sol.total == 6


def test_minimum_total():
    assert minimum_total([8, 8], RankPolicy(tau=0.0)) == 2
    assert minimum_total([8, 3], RankPolicy(tau=0.0, min_rank=4)) == 4 + 3  # n <= min_rank: stays
    assert minimum_total([16, 8], RankPolicy(tau=0.0, multiple_of=8)) == 8 + 8  # rounded to 8 = n: no cut
    assert minimum_total([21], RankPolicy(tau=0.0, min_rank=20)) == 21  # 20 of 21 is refused by the gate
    with pytest.raises(CompreSSMError, match="sizes"):
        minimum_total([], RankPolicy(tau=0.0))


def test_plan_reduction_gives_the_solution_sizes():
    """On real systems: rank_scores -> tau_for_budget -> plan_reduction reproduces the sizes exactly."""
    systems = []
    for seed, n in zip(range(3), (12, 9, 16)):
        lam, B, C = random_diagonal(n, 2, 2, complex_=True, seed=seed, rmin=0.4, rmax=0.97)
        systems.append(LTISystem(A=lam, B=B, C=C))
    lam, B, C = random_diagonal(10, 1, 1, complex_=True, batch=(5,), seed=7)
    systems.append(LTISystem(A=lam, B=B, C=C, reduction="modal"))
    spectra = [rank_scores(s) for s in systems]
    policy = RankPolicy(tau=0.0, min_rank=2)
    for budget in (40, 31, 20, 12, 8):
        sol = tau_for_budget(spectra, budget, policy)
        plans = [plan_reduction(s, dataclasses.replace(policy, tau=sol.tau)) for s in systems]
        sizes = tuple(s.A.shape[-1] if p is None else p.rank for s, p in zip(systems, plans))
        assert sizes == sol.sizes and sol.total <= budget


def test_rank_scores_match_the_plan():
    lam, B, C = random_diagonal(12, 3, 3, complex_=True, seed=3)
    system = LTISystem(A=lam, B=B, C=C)
    plan = plan_reduction(system, RankPolicy(tau=0.1))
    torch.testing.assert_close(rank_scores(system), plan.hsv)
    assert planned_size(rank_scores(system), RankPolicy(tau=0.1)) == plan.rank


def test_attempt_targets():
    assert attempt_targets(256, 64, 4) == [181, 128, 90, 64]  # 256 * 0.25 ** (k / 4), floored
    assert attempt_targets(256, 64, 4, "direct") == [64] * 4
    assert attempt_targets(32, 40, 3) == [40] * 3  # nothing to cut
    assert attempt_targets(100, 10, 1) == [10]
    for start, budget, k in itertools.product((17, 64, 300), (1, 5, 16), (1, 2, 5)):
        targets = attempt_targets(start, budget, k)
        assert targets[-1] == budget and targets == sorted(targets, reverse=True)
        assert all(budget <= x <= max(start, budget) for x in targets)
    with pytest.raises(CompreSSMError, match="budget schedule"):
        attempt_targets(10, 5, 2, "linear")
    with pytest.raises(CompreSSMError, match="attempts"):
        attempt_targets(10, 5, 0)


def test_budget_from_mean():
    assert budget_from_mean(12.7, 10) == 127  # no float round-off below
    assert budget_from_mean(2.5, 3) == 7  # the mean 7 / 3 stays <= 2.5
    assert budget_from_mean(4, 2) == 8
    for bad in (0.5, float("nan"), True, "4"):
        with pytest.raises(CompreSSMError, match="mean state size"):
            budget_from_mean(bad, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(spectra=[A_SPEC], budget=0), "budget must be an int >= 1"),
        (dict(spectra=[A_SPEC], budget=True), "budget must be an int >= 1"),
        (dict(spectra=[], budget=3), "non-empty sequence"),
        (dict(spectra=A_SPEC, budget=3), "non-empty sequence"),
        (dict(spectra=[A_SPEC[None]], budget=3), r"spectra\[0\] must be 1-D"),
        (dict(spectra=[t(1, -1)], budget=3), ">= 0"),
        (
            dict(spectra=[A_SPEC], budget=3, policy=RankPolicy(tau=0.0, mode="fixed")),
            "mode must be 'tolerance'",
        ),
        (dict(spectra=[A_SPEC], budget=3, policy="tau"), "RankPolicy"),
        (dict(spectra=[A_SPEC], budget=3, on_unreachable="ignore"), "on_unreachable"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("policy", RankPolicy(tau=0.0))
    with pytest.raises(CompreSSMError, match=match):
        tau_for_budget(**kwargs)
