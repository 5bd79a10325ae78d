"""Hypothesis property tests (small example counts: the suite must stay fast)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressm_hf import balanced_truncation, hankel_singular_values, select_rank

from .systems import hinf_error, random_diagonal, rng

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@SETTINGS
@given(
    n=st.integers(1, 7),
    m=st.integers(1, 3),
    p=st.integers(1, 3),
    complex_=st.booleans(),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_truncation_error_within_bound(n, m, p, complex_, seed, data):
    lam, B, C = random_diagonal(n, m, p, complex_=complex_, seed=seed, rmin=0.1, rmax=0.97)
    rank = data.draw(st.integers(1, n))
    bt = balanced_truncation(lam, B, C, rank)
    assert torch.isfinite(bt.A).all()
    if rank < n:
        assert float(torch.linalg.eigvals(bt.A).abs().max()) < 1 + 1e-9
    err = hinf_error((lam, B, C, True), (bt.A, bt.B, bt.C, False), num=512)
    assert err <= float(bt.error_bound) * (1 + 1e-7) + 1e-9 * float(bt.hsv[0])


@SETTINGS
@given(n=st.integers(1, 6), complex_=st.booleans(), seed=st.integers(0, 10_000))
def test_hsv_similarity_invariance(n, complex_, seed):
    lam, B, C = random_diagonal(n, 2, 2, complex_=complex_, seed=seed)
    dtype = lam.dtype
    T = torch.randn(n, n, generator=rng(seed), dtype=dtype) + 2 * n**0.5 * torch.eye(n, dtype=dtype)
    T_inv = torch.linalg.inv(T)
    hsv = hankel_singular_values(lam, B, C)
    hsv_t = hankel_singular_values(T @ torch.diag_embed(lam) @ T_inv, T @ B, C @ T_inv)
    torch.testing.assert_close(hsv_t, hsv, rtol=1e-6, atol=1e-8 * float(hsv[0]))


@SETTINGS
@given(
    values=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=12),
    tau=st.floats(0, 0.999),
)
def test_select_rank_is_the_smallest_sufficient_prefix(values, tau):
    hsv = torch.tensor(values, dtype=torch.float64)
    r = select_rank(hsv, tau)
    s = torch.sort(hsv, descending=True).values
    cum = torch.cumsum(s, 0)
    assert 1 <= r <= len(values)
    if float(cum[-1]) > 0:
        assert cum[r - 1] >= (1 - tau) * cum[-1]
        assert r == 1 or cum[r - 2] < (1 - tau) * cum[-1]
    assert select_rank(hsv, min(tau + 0.1, 0.999)) <= r  # monotone in tau
