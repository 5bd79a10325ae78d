"""Gramians against scipy.linalg.solve_discrete_lyapunov, batching, dtypes and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressm_hf import gramians, hankel_singular_values

from .systems import dense, random_dense, random_diagonal, scipy_gramians


def _make(kind, n, m, p, complex_, batch=(), seed=0):
    if kind == "diagonal":
        return random_diagonal(n, m, p, complex_=complex_, batch=batch, seed=seed), True
    return random_dense(n, m, p, complex_=complex_, batch=batch, seed=seed), False


def _rel(x, ref):
    return np.abs(x - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize(("n", "m", "p"), [(1, 1, 1), (5, 1, 1), (8, 3, 2)])
def test_matches_scipy(kind, complex_, n, m, p):
    (A, B, C), diagonal = _make(kind, n, m, p, complex_, seed=n + m)
    P, Q = gramians(A, B, C)
    P_ref, Q_ref = scipy_gramians(A, B, C, diagonal)
    assert P.dtype == (torch.complex128 if complex_ else torch.float64)
    assert P.shape == Q.shape == (n, n)
    assert _rel(P.numpy(), P_ref) < 1e-9
    assert _rel(Q.numpy(), Q_ref) < 1e-9


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_batched_matches_loop(kind):
    (A, B, C), diagonal = _make(kind, 6, 2, 3, True, batch=(2, 3), seed=7)
    P, Q = gramians(A, B, C)
    assert P.shape == Q.shape == (2, 3, 6, 6)
    for i in range(2):
        for j in range(3):
            P_ref, Q_ref = scipy_gramians(A[i, j], B[i, j], C[i, j], diagonal)
            assert _rel(P[i, j].numpy(), P_ref) < 1e-9
            assert _rel(Q[i, j].numpy(), Q_ref) < 1e-9


def test_lyapunov_residual_dense_near_unit_circle():
    A, B, C = random_dense(12, 2, 2, complex_=True, seed=3, rho=0.999)
    P, Q = gramians(A, B, C)
    res_p = A @ P @ A.mH - P + B @ B.mH
    res_q = A.mH @ Q @ A - Q + C.mH @ C
    assert float(res_p.abs().max()) < 1e-10 * float(P.abs().max())
    assert float(res_q.abs().max()) < 1e-10 * float(Q.abs().max())


def test_diagonal_closed_form_equals_dense_solver():
    lam, B, C = random_diagonal(7, 2, 2, complex_=True, seed=11)
    P1, Q1 = gramians(lam, B, C)
    P2, Q2 = gramians(torch.diag_embed(lam), B, C)
    torch.testing.assert_close(P1, P2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Q1, Q2, rtol=1e-10, atol=1e-12)


def test_broadcast_batch_dims_and_explicit_layout():
    lam, B, C = random_diagonal(4, 1, 1, complex_=False, seed=2)
    Bb = torch.stack([B, 2 * B, 3 * B])  # (3, 4, 1)
    P, Q = gramians(lam, Bb, C, diagonal=True)
    assert P.shape == (3, 4, 4)
    torch.testing.assert_close(P[2], 9 * gramians(lam, B, C)[0])
    torch.testing.assert_close(Q[1], Q[0])


def test_dtype_promotion():
    lam, B, C = random_diagonal(3, 1, 1, complex_=False, seed=1)
    P, _ = gramians(lam.float(), B.float(), C.float())
    assert P.dtype == torch.float64
    P, Q = gramians(lam, B.to(torch.complex64), C)
    assert P.dtype == Q.dtype == torch.complex128
    # hermitian
    torch.testing.assert_close(P, P.mH)


def test_works_under_no_grad_and_inference_mode():
    lam, B, C = random_diagonal(4, 2, 2, complex_=True, seed=5)
    with torch.no_grad():
        P, _ = gramians(lam, B, C)
    with torch.inference_mode():
        hsv = hankel_singular_values(dense(lam, True), B, C)
    assert torch.isfinite(P).all() and torch.isfinite(hsv).all()


def test_gradients_flow_diagonal_complex():
    lam, B, C = random_diagonal(5, 2, 2, complex_=True, seed=9)
    lam = lam.clone().requires_grad_(True)
    B = B.clone().requires_grad_(True)
    hsv = hankel_singular_values(lam, B, C)
    hsv.sum().backward()  # Hankel nuclear norm regularizer
    assert lam.grad is not None and B.grad is not None
    assert torch.isfinite(lam.grad).all() and float(lam.grad.abs().sum()) > 0


def test_gradcheck_real_diagonal():
    lam, B, C = random_diagonal(3, 2, 1, complex_=False, seed=4)
    lam, B, C = (t.clone().requires_grad_(True) for t in (lam, B, C))
    assert torch.autograd.gradcheck(lambda a, b, c: gramians(a, b, c), (lam, B, C))
    assert torch.autograd.gradcheck(lambda a, b, c: hankel_singular_values(a, b, c, jitter=0.0), (lam, B, C))


def test_gradcheck_dense_smith():
    A, B, C = random_dense(3, 1, 1, complex_=False, seed=6, rho=0.8)
    A, B, C = (t.clone().requires_grad_(True) for t in (A, B, C))
    assert torch.autograd.gradcheck(lambda a, b, c: gramians(a, b, c), (A, B, C))
