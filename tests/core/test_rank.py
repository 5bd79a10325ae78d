"""select_rank on hand-made spectra, gate, rounding, selection, RankPolicy validation."""

from __future__ import annotations

import pytest
import torch

from compressm_hf import (
    CompreSSMError,
    InvalidRankError,
    InvalidToleranceError,
    RankPolicy,
    apply_gate,
    round_rank,
    select_rank,
    select_states,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    ("hsv", "tau", "expected"),
    [
        (t(4, 3, 2, 1), 0.0, 4),
        (t(4, 3, 2, 1), 0.1, 3),  # need 9 of 10
        (t(4, 3, 2, 1), 0.35, 2),  # need 6.5
        (t(4, 3, 2, 1), 0.5, 2),  # need 5
        (t(4, 3, 2, 1), 0.6, 1),  # need 4: reached exactly
        (t(3, 1, 0, 0), 0.0, 2),  # trailing zeros are dropped at tau = 0
        (t(1, 2, 3, 4), 0.1, 3),  # order does not matter
        (t(0, 0, 0), 0.5, 1),  # all-zero spectrum
        (t(5), 0.9, 1),
        (t(3, 1), 0.2, 2),  # sum(sigma): need 3.2 -> 2 (sigma^2 would give 9/10 >= 0.8 -> 1)
    ],
)
def test_select_rank_hand_made(hsv, tau, expected):
    r = select_rank(hsv, tau)
    assert r == expected and isinstance(r, int)


def test_select_rank_batched():
    hsv = torch.stack([t(4, 3, 2, 1), t(10, 0, 0, 0), t(1, 1, 1, 1)])
    r = select_rank(hsv, 0.1)
    assert r.dtype == torch.int64 and r.tolist() == [3, 1, 4]
    assert select_rank(hsv.reshape(3, 1, 4), 0.1).shape == (3, 1)


@pytest.mark.parametrize("tau", [-0.1, 1.0, 1.5, float("nan"), "0.1", None, True])
def test_select_rank_bad_tau(tau):
    with pytest.raises(InvalidToleranceError, match="tau") as info:
        select_rank(t(1, 2), tau)
    assert isinstance(info.value, ValueError) and "[0.0, 1.0)" in str(info.value)


@pytest.mark.parametrize(
    "hsv", [t(1, float("nan")), t(1, -1), torch.tensor([1j, 1]), [1.0, 2.0], torch.zeros(0)]
)
def test_select_rank_bad_hsv(hsv):
    with pytest.raises(CompreSSMError, match="hsv"):
        select_rank(hsv, 0.1)


def test_apply_gate():
    assert apply_gate(94, 100) is True
    assert apply_gate(95, 100) is False  # needs rank < 0.95 n strictly
    assert apply_gate(100, 100) is False
    assert apply_gate(9, 10, gate=1.0) is True
    assert apply_gate(1, 1, gate=1.0) is False
    with pytest.raises(InvalidRankError, match="101"):
        apply_gate(101, 100)
    with pytest.raises(InvalidRankError, match="0"):
        apply_gate(0, 100)
    with pytest.raises(CompreSSMError, match="gate"):
        apply_gate(5, 10, gate=0.0)
    with pytest.raises(CompreSSMError, match="gate"):
        apply_gate(5, 10, gate=1.5)


def test_round_rank():
    assert round_rank(5, 8, 100) == 8
    assert round_rank(8, 8, 100) == 8
    assert round_rank(9, 8, 100) == 16
    assert round_rank(97, 8, 100) == 100  # capped at n
    assert round_rank(3, 1, 10) == 3
    with pytest.raises(InvalidRankError, match="multiple_of"):
        round_rank(3, 0, 10)
    with pytest.raises(InvalidRankError, match="11"):
        round_rank(11, 2, 10)
    with pytest.raises(InvalidRankError):
        round_rank(2.5, 2, 10)


def test_select_states():
    scores = t(0.5, 3.0, 1.0, 2.0, 0.1)
    largest = select_states(scores, 2, "largest")
    assert largest.dtype == torch.int64 and largest.tolist() == [1, 3]
    assert select_states(scores, 2, "smallest").tolist() == [0, 4]
    assert select_states(t(1, 1, 1, 1), 2, "largest").tolist() == [0, 1]  # ties: lower index
    r1 = select_states(scores, 3, "random", torch.Generator().manual_seed(0))
    r2 = select_states(scores, 3, "random", torch.Generator().manual_seed(0))
    assert r1.tolist() == r2.tolist() == sorted(set(r1.tolist())) and len(r1) == 3
    assert select_states(scores, 5, "random").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(CompreSSMError, match="selection"):
        select_states(scores, 2, "best")
    with pytest.raises(InvalidRankError, match="6"):
        select_states(scores, 6)
    with pytest.raises(CompreSSMError, match="1-D"):
        select_states(scores[None], 1)


def test_rank_policy_defaults_and_validation():
    p = RankPolicy(0.1)
    assert (p.mode, p.gate, p.min_rank, p.multiple_of, p.selection, p.fixed_fraction) == (
        "tolerance",
        0.95,
        1,
        1,
        "largest",
        0.1,
    )
    bad = [
        ({"tau": 1.0}, InvalidToleranceError, "tau"),
        ({"tau": 0.1, "mode": "pragmatic"}, CompreSSMError, "mode"),
        ({"tau": 0.1, "gate": 0.0}, CompreSSMError, "gate"),
        ({"tau": 0.1, "min_rank": 0}, InvalidRankError, "min_rank"),
        ({"tau": 0.1, "multiple_of": 2.0}, InvalidRankError, "multiple_of"),
        ({"tau": 0.1, "selection": "top"}, CompreSSMError, "selection"),
        ({"tau": 0.1, "fixed_fraction": 1.0}, CompreSSMError, "fixed_fraction"),
        ({"tau": 0.1, "fixed_fraction": 0}, CompreSSMError, "fixed_fraction"),
    ]
    for kwargs, err, word in bad:
        with pytest.raises(err, match=word) as info:
            RankPolicy(**kwargs)
        assert isinstance(info.value, ValueError)
