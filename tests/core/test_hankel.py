"""Hankel singular values: reference values, similarity invariance, semi-definite Gramians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressm_hf import hankel_singular_values

from .systems import np_hsv, random_dense, random_diagonal, rng


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("diagonal", [True, False])
def test_matches_reference_and_sorted(complex_, diagonal):
    make = random_diagonal if diagonal else random_dense
    A, B, C = make(6, 2, 3, complex_=complex_, seed=21)
    hsv = hankel_singular_values(A, B, C)
    assert hsv.dtype == torch.float64 and hsv.shape == (6,)
    assert bool((hsv[:-1] >= hsv[1:]).all())
    np.testing.assert_allclose(hsv.numpy(), np_hsv(A, B, C, diagonal), rtol=1e-7)


@pytest.mark.parametrize("complex_", [False, True])
def test_invariant_under_similarity(complex_):
    lam, B, C = random_diagonal(8, 2, 2, complex_=complex_, seed=5)
    hsv = hankel_singular_values(lam, B, C)
    dtype = torch.complex128 if complex_ else torch.float64
    for seed in range(3):
        T = torch.randn(8, 8, generator=rng(seed), dtype=dtype) + 3 * torch.eye(8, dtype=dtype)
        T_inv = torch.linalg.inv(T)
        hsv_t = hankel_singular_values(T @ torch.diag_embed(lam) @ T_inv, T @ B, C @ T_inv)
        torch.testing.assert_close(hsv_t, hsv, rtol=1e-7, atol=1e-9)


def test_batched_shape_and_values():
    lam, B, C = random_diagonal(5, 1, 1, complex_=True, batch=(3, 2), seed=8)
    hsv = hankel_singular_values(lam, B, C)
    assert hsv.shape == (3, 2, 5)
    torch.testing.assert_close(hsv[2, 1], hankel_singular_values(lam[2, 1], B[2, 1], C[2, 1]))


def test_uncontrollable_state_gives_zero_hsv_not_nan():
    lam, B, C = random_diagonal(5, 2, 2, complex_=True, seed=3)
    B = B.clone()
    B[2] = 0  # state 2 is not controllable -> P singular
    hsv = hankel_singular_values(lam, B, C)
    assert torch.isfinite(hsv).all()
    assert float(hsv[-1]) < 1e-5 * float(hsv[0])
    np.testing.assert_allclose(hsv[:4].numpy(), np_hsv(lam, B, C, True)[:4], rtol=1e-6)


def test_zero_system_all_zero_hsv():
    lam, B, C = random_diagonal(4, 1, 1, complex_=False, seed=1)
    hsv = hankel_singular_values(lam, torch.zeros_like(B), C)
    assert torch.isfinite(hsv).all() and float(hsv.max()) < 1e-100


def test_single_state_closed_form():
    lam = torch.tensor([0.9 * np.exp(0.3j)], dtype=torch.complex128)
    B = torch.tensor([[2.0 + 0j, 1j]], dtype=torch.complex128)
    C = torch.tensor([[3.0 + 0j]], dtype=torch.complex128)
    expected = np.sqrt(5.0) * 3.0 / (1 - 0.81)
    torch.testing.assert_close(
        hankel_singular_values(lam, B, C, jitter=0.0).item(), expected, rtol=1e-12, atol=0
    )
