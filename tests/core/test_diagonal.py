"""rediagonalize: transfer-function round trip, clamps, phase convention."""

from __future__ import annotations

import math

import pytest
import torch

from compressm_hf import CompreSSMError, InvalidSystemError, rediagonalize

from .systems import hinf_error, random_diagonal, rng


@pytest.mark.parametrize("complex_", [False, True])
def test_round_trip_same_transfer_function(complex_):
    lam, B, C = random_diagonal(6, 2, 3, complex_=complex_, seed=3)
    dtype = lam.dtype
    T = torch.randn(6, 6, generator=rng(1), dtype=dtype) + 3 * torch.eye(6, dtype=dtype)
    T_inv = torch.linalg.inv(T)
    A_dense, B_dense, C_dense = T @ torch.diag_embed(lam) @ T_inv, T @ B, C @ T_inv
    d = rediagonalize(A_dense, B_dense, C_dense, min_phase=0.0)  # exact: no phase adjustment
    assert d.A.shape == (6,) and d.B.shape == (6, 2) and d.C.shape == (3, 6)
    assert d.A.dtype == d.B.dtype == d.C.dtype == torch.complex128
    assert d.num_clamped == 0 and d.num_phase_adjusted == 0
    # with the default min_phase, the real positive eigenvalues of a real system get a tiny phase
    expected = int((lam > 0).sum()) if not complex_ else 0
    assert rediagonalize(A_dense, B_dense, C_dense).num_phase_adjusted == expected
    ref = torch.sort(lam.abs(), descending=True).values
    torch.testing.assert_close(d.A.abs(), ref)
    assert hinf_error((lam, B, C, True), (d.A, d.B, d.C, True)) < 1e-9 * float(B.abs().max() * C.abs().max())
    phase = torch.remainder(torch.angle(rediagonalize(A_dense, B_dense, C_dense).A), 2 * math.pi)
    assert bool(((phase > 0) & (phase < 2 * math.pi)).all())


def test_clamps_modulus_and_phase():
    A = torch.diag(torch.tensor([1.2, 0.0, 0.5, -0.7], dtype=torch.float64))
    B = torch.ones(4, 1, dtype=torch.float64)
    C = torch.ones(1, 4, dtype=torch.float64)
    d = rediagonalize(A, B, C, max_modulus=0.99)
    assert d.num_clamped == 2  # 1.2 -> 0.99 and 0 -> min_modulus
    # the phase of 1.2 (clamped), 0.5 and 0 is 0 -> raised to min_phase; -0.7 has phase pi
    assert d.num_phase_adjusted == 3
    modulus = d.A.abs()
    assert float(modulus.max()) <= 0.99 + 1e-15 and float(modulus.min()) >= 1e-12 * (1 - 1e-12)
    phase = torch.remainder(torch.angle(d.A), 2 * math.pi)
    assert float(phase.min()) >= 1e-8 * (1 - 1e-9)
    torch.testing.assert_close(
        d.A[0], torch.polar(torch.tensor(0.99, dtype=torch.float64), torch.tensor(1e-8, dtype=torch.float64))
    )
    assert torch.isclose(d.A[1], torch.tensor(-0.7 + 0j, dtype=torch.complex128))  # sorted by |lambda|


def test_batched():
    lam, B, C = random_diagonal(4, 1, 1, complex_=True, batch=(3,), seed=2)
    d = rediagonalize(torch.diag_embed(lam), B, C)
    assert d.A.shape == (3, 4) and d.B.shape == (3, 4, 1) and d.C.shape == (3, 1, 4)


def test_autograd_flows():
    lam, B, C = random_diagonal(3, 1, 1, complex_=True, seed=4)
    T = torch.randn(3, 3, generator=rng(2), dtype=torch.complex128) + 3 * torch.eye(3)
    A = (T @ torch.diag_embed(lam) @ torch.linalg.inv(T)).requires_grad_(True)
    d = rediagonalize(A, T @ B, C @ torch.linalg.inv(T))
    (d.C @ d.B).abs().sum().backward()  # gauge-invariant residues
    assert A.grad is not None and torch.isfinite(A.grad).all()


def test_errors():
    A = torch.eye(2) * 0.5
    B = torch.ones(2, 1)
    C = torch.ones(1, 2)
    with pytest.raises(CompreSSMError, match="max_modulus"):
        rediagonalize(A, B, C, max_modulus=1.0)
    with pytest.raises(CompreSSMError, match="min_phase"):
        rediagonalize(A, B, C, min_phase=-1.0)
    with pytest.raises(InvalidSystemError, match="non-finite"):
        rediagonalize(A, B * float("nan"), C)
    with pytest.raises(InvalidSystemError, match="square"):
        rediagonalize(torch.ones(2, 3), B, C)
