"""Random stable test systems and independent reference computations (numpy/scipy)."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sl
import torch


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_eigs(n, *, complex_, batch=(), seed=0, rmin=0.3, rmax=0.95):
    """Stable eigenvalues: modulus uniform in [rmin, rmax]; real ones get random signs."""
    g = rng(seed)
    r = rmin + (rmax - rmin) * torch.rand(*batch, n, generator=g, dtype=torch.float64)
    if complex_:
        phase = 2 * torch.pi * torch.rand(*batch, n, generator=g, dtype=torch.float64)
        return torch.polar(r, phase)
    return r * torch.where(torch.rand(*batch, n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)


def random_bc(n, m, p, *, complex_, batch=(), seed=0):
    g = rng(seed + 1000)
    dtype = torch.complex128 if complex_ else torch.float64
    B = torch.randn(*batch, n, m, generator=g, dtype=dtype)
    C = torch.randn(*batch, p, n, generator=g, dtype=dtype)
    return B, C


def random_diagonal(n, m, p, *, complex_, batch=(), seed=0, **kw):
    lam = random_eigs(n, complex_=complex_, batch=batch, seed=seed, **kw)
    return (lam, *random_bc(n, m, p, complex_=complex_, batch=batch, seed=seed))


def random_dense(n, m, p, *, complex_, batch=(), seed=0, rho=0.95):
    """Dense non-normal A with spectral radius rho (real or complex)."""
    g = rng(seed + 2000)
    dtype = torch.complex128 if complex_ else torch.float64
    A = torch.randn(*batch, n, n, generator=g, dtype=dtype)
    radius = torch.linalg.eigvals(A).abs().amax(-1)
    A = A * (rho / radius)[..., None, None]
    return (A, *random_bc(n, m, p, complex_=complex_, batch=batch, seed=seed))


def dense(A: torch.Tensor, diagonal: bool) -> torch.Tensor:
    return torch.diag_embed(A) if diagonal else A


def scipy_gramians(A, B, C, diagonal):
    """Reference Gramians of one (unbatched) system by scipy.linalg.solve_discrete_lyapunov."""
    A = dense(A, diagonal).numpy()
    B, C = B.numpy(), C.numpy()
    P = sl.solve_discrete_lyapunov(A, B @ B.conj().T)
    Q = sl.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
    return P, Q


def freq_response(A, B, C, diagonal, num=1024):
    """G(z) = C (zI - A)^-1 B on z = exp(i w), w uniform on [0, 2 pi): (num, p, m) complex128."""
    w = torch.linspace(0, 2 * torch.pi, num + 1, dtype=torch.float64)[:-1]
    z = torch.exp(1j * w)
    A, B, C = (t.to(torch.complex128) for t in (A, B, C))
    if diagonal:
        return C @ (B / (z[:, None, None] - A[:, None]))
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.complex128)
    return C @ torch.linalg.solve(z[:, None, None] * eye - A, B)


def hinf_error(sys1, sys2, num=1024):
    """max_w ||G1 - G2||_2 on the grid; each sys is (A, B, C, diagonal)."""
    diff = freq_response(*sys1, num=num) - freq_response(*sys2, num=num)
    return float(torch.linalg.matrix_norm(diff, ord=2).max())


def impulse_response(A, B, C, diagonal, steps=30):
    """Markov parameters C A^k B, k = 0..steps-1: (steps, p, m)."""
    A = dense(A, diagonal).to(torch.complex128)
    X = B.to(torch.complex128)
    out = []
    for _ in range(steps):
        out.append(C.to(torch.complex128) @ X)
        X = A @ X
    return torch.stack(out)


def np_hsv(A, B, C, diagonal):
    """Reference HSVs sqrt(eig(P Q)) from scipy Gramians (fine for well-conditioned systems)."""
    P, Q = scipy_gramians(A, B, C, diagonal)
    ev = np.linalg.eigvals(P @ Q).real.clip(min=0)
    return np.sort(np.sqrt(ev))[::-1].copy()
