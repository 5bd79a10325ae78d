"""plan_reduction end to end: balanced (largest / smallest / random), modal, gate, rank policy."""

from __future__ import annotations

import pytest
import torch

from compressm_hf import (
    InvalidSystemError,
    LTISystem,
    RankPolicy,
    ReductionPlan,
    UnstableSystemError,
    hankel_singular_values,
    modal_importance,
    plan_reduction,
)

from .systems import hinf_error, random_dense, random_diagonal


def lru_like(n=12, m=3, p=3, seed=0):
    lam, B, C = random_diagonal(n, m, p, complex_=True, seed=seed, rmin=0.5, rmax=0.99)
    B = B * torch.sqrt(1 - lam.abs() ** 2)[:, None]  # gamma normalisation as in the LRU
    return LTISystem(A=lam, B=B, C=C)


def test_balanced_largest_end_to_end():
    system = lru_like()
    plan = plan_reduction(system, RankPolicy(tau=0.1))
    assert isinstance(plan, ReductionPlan)
    hsv = hankel_singular_values(system.A, system.B, system.C)
    torch.testing.assert_close(plan.hsv, hsv)
    cum = torch.cumsum(hsv, 0) / hsv.sum()
    assert cum[plan.rank - 1] >= 0.9 and (plan.rank == 1 or cum[plan.rank - 2] < 0.9)
    assert plan.rule == "balanced" and plan.selection == "largest" and plan.keep is None
    assert plan.energy_kept == pytest.approx(float(cum[plan.rank - 1]))
    assert plan.error_bound == pytest.approx(2 * float(hsv[plan.rank :].sum()))
    d = plan.diagonal
    assert (
        d.diagonal
        and d.A.shape == (plan.rank,)
        and d.B.shape == (plan.rank, 3)
        and d.C.shape == (3, plan.rank)
    )
    assert d.A.dtype == torch.complex128 and float(d.A.abs().max()) < 1
    assert plan.extra["num_clamped"] == 0
    err = hinf_error((system.A, system.B, system.C, True), (d.A, d.B, d.C, True))
    assert err <= plan.error_bound * (1 + 1e-6)


def test_balanced_smallest_keeps_trailing():
    system = lru_like(seed=1)
    plan = plan_reduction(system, RankPolicy(tau=0.1, selection="smallest"))
    hsv = plan.hsv
    r = plan.rank
    assert plan.energy_kept == pytest.approx(float(hsv[-r:].sum() / hsv.sum()))
    assert plan.error_bound == pytest.approx(2 * float(hsv[:-r].sum()))
    assert plan.diagonal.A.shape == (r,) and torch.isfinite(plan.diagonal.B).all()
    assert float(plan.diagonal.A.abs().max()) < 1


def test_balanced_random_is_modal_subset():
    system = lru_like(seed=2)
    policy = RankPolicy(tau=0.1, selection="random")
    plan = plan_reduction(system, policy, generator=torch.Generator().manual_seed(0))
    again = plan_reduction(system, policy, generator=torch.Generator().manual_seed(0))
    largest = plan_reduction(system, RankPolicy(tau=0.1))
    assert plan.rank == largest.rank and plan.keep.tolist() == again.keep.tolist()
    assert plan.keep.dtype == torch.int64 and len(plan.keep) == plan.rank
    torch.testing.assert_close(plan.diagonal.A, system.A[plan.keep])
    torch.testing.assert_close(plan.diagonal.B, system.B[plan.keep])
    torch.testing.assert_close(plan.diagonal.C, system.C[:, plan.keep])
    err = hinf_error(
        (system.A, system.B, system.C, True), (plan.diagonal.A, plan.diagonal.B, plan.diagonal.C, True)
    )
    assert err <= plan.error_bound


def test_dense_balanced_system():
    A, B, C = random_dense(8, 2, 2, complex_=False, seed=3)
    plan = plan_reduction(LTISystem(A, B, C, diagonal=False), RankPolicy(tau=0.2))
    assert plan is not None and plan.diagonal.A.shape == (plan.rank,)
    with pytest.raises(InvalidSystemError, match="random"):
        plan_reduction(LTISystem(A, B, C, diagonal=False), RankPolicy(tau=0.2, selection="random"))


def test_gate_refuses_returns_none():
    system = lru_like(seed=4)
    assert plan_reduction(system, RankPolicy(tau=0.0)) is None  # rank == n
    assert plan_reduction(system, RankPolicy(tau=0.3, gate=0.01)) is None
    one = LTISystem(A=system.A[:1], B=system.B[:1], C=system.C[:, :1])
    assert plan_reduction(one, RankPolicy(tau=0.5)) is None


def test_fixed_mode_min_rank_and_rounding():
    system = lru_like(n=20, seed=5)
    plan = plan_reduction(system, RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.1))
    assert plan.rank == 18  # floor(0.9 * 20)
    assert plan_reduction(system, RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.04)) is None  # 19 >= 19
    plan = plan_reduction(system, RankPolicy(tau=0.9, min_rank=6))
    assert plan.rank == 6 and plan.extra["rule_rank"] < 6
    plan = plan_reduction(system, RankPolicy(tau=0.9, min_rank=5, multiple_of=4))
    assert plan.rank == 8


def mamba_like(d_inner=6, n=10, seed=0):
    """One SISO diagonal system per channel sharing the state index, real negative-exp eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    A = torch.exp(-torch.rand(d_inner, n, generator=g, dtype=torch.float64) * torch.arange(1, n + 1))
    B = torch.randn(d_inner, n, 1, generator=g, dtype=torch.float64) / torch.arange(1, n + 1)[:, None]
    C = torch.randn(d_inner, 1, n, generator=g, dtype=torch.float64)
    return LTISystem(A=A, B=B, C=C, diagonal=True, reduction="modal")


def test_modal_end_to_end():
    system = mamba_like()
    plan = plan_reduction(system, RankPolicy(tau=0.1))
    scores = modal_importance(system.A, system.B, system.C).sum(0)
    ranked = torch.sort(scores, descending=True).values
    torch.testing.assert_close(plan.hsv, ranked)
    assert plan.rule == "modal" and plan.diagonal is None
    expected_keep = torch.sort(torch.argsort(scores, descending=True)[: plan.rank]).values
    assert plan.keep.tolist() == expected_keep.tolist()
    kept = scores[plan.keep].sum()
    assert plan.energy_kept == pytest.approx(float(kept / scores.sum()))
    assert plan.error_bound == pytest.approx(2 * float(scores.sum() - kept))
    assert plan.extra["num_channels"] == 6
    # the bound holds for the summed per-channel H-infinity errors of the exact LTI channels
    total_err = 0.0
    for i in range(6):
        full = (system.A[i], system.B[i], system.C[i], True)
        cut = (system.A[i, plan.keep], system.B[i, plan.keep], system.C[i][:, plan.keep], True)
        total_err += hinf_error(full, cut)
    assert total_err <= plan.error_bound


def test_modal_random_and_smallest():
    system = mamba_like(seed=1)
    g = torch.Generator().manual_seed(3)
    plan = plan_reduction(system, RankPolicy(tau=0.2, selection="random"), generator=g)
    assert plan.keep.shape == (plan.rank,) and plan.selection == "random"
    small = plan_reduction(system, RankPolicy(tau=0.2, selection="smallest"))
    scores = modal_importance(system.A, system.B, system.C).sum(0)
    assert small.keep.tolist() == sorted(torch.argsort(scores)[: small.rank].tolist())


def test_validation_before_math():
    system = lru_like(seed=6)
    B = system.B.clone()
    B[0, 0] = float("nan")
    with pytest.raises(InvalidSystemError, match="NaN"):
        plan_reduction(LTISystem(system.A, B, system.C), RankPolicy(0.1))
    A = system.A.clone()
    A[3] = 1.0
    with pytest.raises(UnstableSystemError, match=r"index \(3,\)"):
        plan_reduction(LTISystem(A, system.B, system.C), RankPolicy(0.1))
    with pytest.raises(InvalidSystemError, match="batch"):
        plan_reduction(LTISystem(system.A[None], system.B[None], system.C[None]), RankPolicy(0.1))
    with pytest.raises(InvalidSystemError, match="diagonal"):
        plan_reduction(
            LTISystem(torch.diag(system.A), system.B, system.C, diagonal=False, reduction="modal"),
            RankPolicy(0.1),
        )
    with pytest.raises(InvalidSystemError, match="reduction"):
        plan_reduction(LTISystem(system.A, system.B, system.C, reduction="other"), RankPolicy(0.1))
    with pytest.raises(InvalidSystemError, match="LTISystem"):
        plan_reduction((system.A, system.B, system.C), RankPolicy(0.1))
    with pytest.raises(InvalidSystemError, match="RankPolicy"):
        plan_reduction(system, 0.1)
    with pytest.raises(InvalidSystemError, match=r"B must be \(\.\.\., n=12, m\)"):
        plan_reduction(LTISystem(system.A, system.B[:5], system.C), RankPolicy(0.1))


@pytest.mark.parametrize("selection", ["largest", "smallest", "random"])
def test_zero_system_is_finite(selection):
    system = lru_like(n=6, seed=7)
    zero = LTISystem(A=system.A, B=torch.zeros_like(system.B), C=system.C)
    plan = plan_reduction(zero, RankPolicy(tau=0.1, selection=selection), torch.Generator().manual_seed(0))
    assert plan.rank == 1 and plan.error_bound == pytest.approx(0.0, abs=1e-100)
    for t in (plan.diagonal.A, plan.diagonal.B, plan.diagonal.C):
        assert torch.isfinite(t).all()
    assert float(plan.diagonal.A.abs().max()) < 1


def test_plan_under_grad_enabled_inputs_does_not_track_grad():
    system = lru_like(seed=8)
    system = LTISystem(A=system.A.clone().requires_grad_(True), B=system.B, C=system.C)
    plan = plan_reduction(system, RankPolicy(tau=0.2))
    assert not plan.diagonal.A.requires_grad and not plan.hsv.requires_grad
