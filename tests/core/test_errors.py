"""Every error path: a ValueError subclass that names the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from compressm_hf import (
    CompreSSMError,
    InvalidRankError,
    InvalidSystemError,
    UnstableSystemError,
    balanced_truncation,
    gramians,
    hankel_singular_values,
    modal_importance,
    modal_truncation,
)

from .systems import random_diagonal

lam, B, C = random_diagonal(4, 2, 3, complex_=True, seed=0)
FUNCS = [gramians, hankel_singular_values, lambda a, b, c: balanced_truncation(a, b, c, 2)]


def nan_at(t, idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


BAD_SYSTEMS = [
    ((lam, B[:3], C), InvalidSystemError, r"B must be \(\.\.\., n=4, m\), got shape \(3, 2\)"),
    ((lam, B, C[:, :3]), InvalidSystemError, r"C must be \(\.\.\., p, n=4\), got shape \(3, 3\)"),
    ((torch.ones(4, 3) * 0.5, B, C), InvalidSystemError, "square"),
    ((lam, B[0], C), InvalidSystemError, r"B must be \(\.\.\., n, m\)"),
    ((lam[None, None], B, C), InvalidSystemError, "pass diagonal=True"),
    ((lam[None], torch.stack([B, B]), torch.stack([C, C, C])), InvalidSystemError, "broadcast"),
    ((nan_at(lam, 1), B, C), InvalidSystemError, r"A contains 1 non-finite value.*index \(1,\)"),
    ((lam, nan_at(B, (0, 1), float("inf")), C), InvalidSystemError, r"B contains .*index \(0, 1\)"),
    ((nan_at(lam, 2, 1.0 + 0j), B, C), UnstableSystemError, r"\|lambda\| = 1\.0.*< 1"),
    ((nan_at(lam, 0, 1.5j), B, C), UnstableSystemError, "1.5"),
    ((torch.eye(4) * 1.01, B, C), UnstableSystemError, "eigenvalue of A"),
    ((lam, B.abs() > 0, C), InvalidSystemError, "dtype torch.bool"),
    (([0.5, 0.5, 0.5, 0.5], B, C), InvalidSystemError, "torch.Tensor"),
    ((torch.zeros(0), torch.zeros(0, 1), torch.zeros(1, 0)), InvalidSystemError, ">= 1"),
]


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize(("args", "err", "pattern"), BAD_SYSTEMS)
def test_bad_systems(func, args, err, pattern):
    with pytest.raises(err, match=pattern) as info:
        func(*args)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CompreSSMError)


def test_unstable_is_invalid_system():
    assert issubclass(UnstableSystemError, InvalidSystemError)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rank": 0}, r"\[1, n=4\], got 0"),
        ({"rank": 5}, r"\[1, n=4\], got 5"),
        ({"rank": 2.0}, "int"),
        ({"rank": None}, "give rank"),
        ({"keep": torch.tensor([0, 0])}, "distinct"),
        ({"keep": torch.tensor([0, 4])}, r"\[0, 4\)"),
        ({"keep": torch.tensor([-1])}, r"\[0, 4\)"),
        ({"keep": torch.tensor([0.5])}, "integer"),
        ({"keep": torch.tensor([], dtype=torch.int64)}, "1-D"),
        ({"rank": 3, "keep": torch.tensor([0, 1])}, "must agree"),
    ],
)
def test_balanced_truncation_bad_rank(kwargs, pattern):
    with pytest.raises(InvalidRankError, match=pattern) as info:
        balanced_truncation(lam, B, C, **kwargs)
    assert isinstance(info.value, ValueError)


def test_modal_errors():
    with pytest.raises(UnstableSystemError):
        modal_importance(nan_at(lam, 0, 1.0 + 0j), B, C)
    with pytest.raises(InvalidSystemError, match="diagonal"):
        modal_truncation(torch.diag(lam), B, C, torch.tensor([0]))
    with pytest.raises(InvalidRankError, match="distinct"):
        modal_truncation(lam, B, C, torch.tensor([1, 1]))
    with pytest.raises(InvalidSystemError, match="NaN"):
        modal_truncation(lam, nan_at(B, (1, 1)), C, torch.tensor([1]))


def test_smith_non_convergence_is_an_error_not_nan():
    # |lambda| = 1 - 1e-17 rounds to 1 in float64 and is caught as unstable before any math
    with pytest.raises(UnstableSystemError):
        gramians(torch.eye(2, dtype=torch.float64) * (1 - 1e-17), B[:2].real, C[:, :2].real)
