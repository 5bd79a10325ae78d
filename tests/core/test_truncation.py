"""Balanced truncation: balancing, full-rank reproduction, stability, the 2*sum(sigma) bound; modal truncation."""

from __future__ import annotations

import pytest
import torch

from compressm_hf import (
    balanced_truncation,
    gramians,
    hankel_singular_values,
    modal_importance,
    modal_truncation,
)

from .systems import hinf_error, impulse_response, random_dense, random_diagonal

CASES = [(d, c) for d in (True, False) for c in (False, True)]


def _make(diagonal, complex_, n=8, m=2, p=3, seed=0, **kw):
    return (random_diagonal if diagonal else random_dense)(n, m, p, complex_=complex_, seed=seed, **kw)


@pytest.mark.parametrize(("diagonal", "complex_"), CASES)
def test_balanced_coordinates_full_rank(diagonal, complex_):
    A, B, C = _make(diagonal, complex_, seed=1)
    bt = balanced_truncation(A, B, C, rank=8, jitter=0.0)
    P, Q = gramians(A, B, C)
    S = torch.diag(bt.hsv).to(P.dtype)
    scale = float(bt.hsv[0])
    torch.testing.assert_close(bt.T_inv @ P @ bt.T_inv.mH, S, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(bt.T.mH @ Q @ bt.T, S, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(bt.T_inv @ bt.T, torch.eye(8, dtype=P.dtype), rtol=0, atol=1e-9)
    assert float(bt.error_bound) == 0.0


@pytest.mark.parametrize(("diagonal", "complex_"), CASES)
def test_full_rank_reproduces_impulse_response(diagonal, complex_):
    A, B, C = _make(diagonal, complex_, seed=2)
    bt = balanced_truncation(A, B, C, 8)
    h = impulse_response(A, B, C, diagonal)
    h_r = impulse_response(bt.A, bt.B, bt.C, False)
    torch.testing.assert_close(h_r, h, rtol=1e-7, atol=1e-9 * float(h.abs().max()))
    if not complex_:
        assert bt.A.dtype == torch.float64 and bt.T.dtype == torch.float64


@pytest.mark.parametrize(("diagonal", "complex_"), CASES)
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_truncated_is_stable_and_within_bound(diagonal, complex_, rank):
    A, B, C = (
        _make(diagonal, complex_, seed=10 + rank, rmax=0.98)
        if diagonal
        else _make(diagonal, complex_, seed=10 + rank)
    )
    bt = balanced_truncation(A, B, C, rank)
    assert bt.A.shape == (rank, rank) and bt.B.shape == (rank, 2) and bt.C.shape == (3, rank)
    assert bt.T.shape == (8, rank) and bt.T_inv.shape == (rank, 8)
    assert float(torch.linalg.eigvals(bt.A).abs().max()) < 1
    torch.testing.assert_close(bt.error_bound, 2 * bt.hsv[rank:].sum())
    err = hinf_error((A, B, C, diagonal), (bt.A, bt.B, bt.C, False))
    assert err <= float(bt.error_bound) * (1 + 1e-8) + 1e-10
    # the bound is not vacuous: the error is at least the first discarded sigma
    assert err >= float(bt.hsv[rank]) * (1 - 1e-3)


def test_keep_trailing_coordinates():
    A, B, C = _make(True, True, seed=4)
    bt = balanced_truncation(A, B, C, keep=torch.arange(5, 8))
    assert bt.A.shape == (3, 3)
    torch.testing.assert_close(bt.error_bound, 2 * bt.hsv[:5].sum())
    # trailing balanced coordinates = the least important: a worse approximation than the leading 3
    lead = balanced_truncation(A, B, C, 3)
    full = (A, B, C, True)
    assert hinf_error(full, (bt.A, bt.B, bt.C, False)) > hinf_error(full, (lead.A, lead.B, lead.C, False))


def test_batched_matches_loop():
    A, B, C = random_diagonal(6, 1, 1, complex_=True, batch=(3,), seed=5)
    bt = balanced_truncation(A, B, C, 2)
    assert bt.A.shape == (3, 2, 2) and bt.error_bound.shape == (3,)
    one = balanced_truncation(A[1], B[1], C[1], 2)
    torch.testing.assert_close(bt.hsv[1], one.hsv)
    h = impulse_response(bt.A[1], bt.B[1], bt.C[1], False)
    torch.testing.assert_close(h, impulse_response(one.A, one.B, one.C, False))


def test_modal_importance_is_single_state_hsv():
    lam, B, C = random_diagonal(6, 2, 3, complex_=True, batch=(2,), seed=6)
    imp = modal_importance(lam, B, C)
    P, Q = gramians(lam, B, C)
    expected = torch.sqrt(torch.diagonal(P, dim1=-2, dim2=-1).real * torch.diagonal(Q, dim1=-2, dim2=-1).real)
    torch.testing.assert_close(imp, expected)
    single = hankel_singular_values(lam[0, 2:3], B[0, 2:3], C[0, :, 2:3], jitter=0.0)
    torch.testing.assert_close(imp[0, 2:3], single)


@pytest.mark.parametrize("complex_", [False, True])
def test_modal_truncation_and_its_bound(complex_):
    lam, B, C = random_diagonal(8, 2, 2, complex_=complex_, seed=7)
    keep = torch.tensor([0, 3, 5])
    A_k, B_k, C_k = modal_truncation(lam, B, C, keep)
    torch.testing.assert_close(A_k, lam[keep])
    torch.testing.assert_close(B_k, B[keep])
    torch.testing.assert_close(C_k, C[:, keep])
    imp = modal_importance(lam, B, C)
    mask = torch.ones(8, dtype=torch.bool)
    mask[keep] = False
    err = hinf_error((lam, B, C, True), (A_k, B_k, C_k, True))
    assert err <= 2 * float(imp[mask].sum())


def test_modal_truncation_batched():
    lam, B, C = random_diagonal(5, 1, 1, complex_=True, batch=(4,), seed=8)
    A_k, B_k, C_k = modal_truncation(lam, B, C, torch.tensor([1, 4]))
    assert A_k.shape == (4, 2) and B_k.shape == (4, 2, 1) and C_k.shape == (4, 1, 2)
