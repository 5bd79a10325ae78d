"""CompressionSchedule: resolution against max_steps and validation."""

from __future__ import annotations

import pytest

from compressm_hf.trainer import CompressionSchedule


def test_default_is_four_attempts_in_first_ten_percent():
    assert CompressionSchedule().resolve(100_000) == [2500, 5000, 7500, 10000]
    assert CompressionSchedule().resolve(1000) == [25, 50, 75, 100]


def test_window_and_attempts():
    assert CompressionSchedule(window=(0.1, 0.5), attempts=2).resolve(100) == [30, 50]
    assert CompressionSchedule(window=(0.0, 1.0), attempts=1).resolve(7) == [7]
    assert CompressionSchedule(window=[0.2, 0.4], attempts=2).window == (0.2, 0.4)


def test_short_runs_merge_colliding_points_and_never_hit_step_zero():
    assert CompressionSchedule().resolve(10) == [1]
    assert CompressionSchedule().resolve(40) == [1, 2, 3, 4]


def test_explicit_steps_sorted_deduplicated():
    s = CompressionSchedule(steps=[30, 10, 10, 20])
    assert s.resolve(30) == [10, 20, 30]
    assert not s.is_fractional
    assert s.to_dict() == {"steps": [10, 20, 30]}


def test_coerce():
    assert CompressionSchedule.coerce([5, 3]).resolve(10) == [3, 5]
    assert CompressionSchedule.coerce(None, attempts=2).resolve(100) == [5, 10]
    s = CompressionSchedule(steps=[1])
    assert CompressionSchedule.coerce(s) is s
    with pytest.raises(ValueError, match="not both"):
        CompressionSchedule.coerce([1], steps=[2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": (0.2, 0.1)}, "0 <= start < end <= 1"),
        ({"window": (0.0, 1.5)}, "0 <= start < end <= 1"),
        ({"window": (-0.1, 0.1)}, "0 <= start < end <= 1"),
        ({"window": (0.1, 0.1)}, "0 <= start < end <= 1"),
        ({"window": "abc"}, "pair"),
        ({"window": (float("nan"), 0.1)}, "0 <= start < end <= 1"),
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"steps": []}, "empty"),
        ({"steps": [0, 5]}, "positive integers"),
        ({"steps": [-3]}, "positive integers"),
        ({"steps": [1.5]}, "positive integers"),
        ({"steps": "10"}, "sequence"),
    ],
)
def test_validation_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionSchedule(**kwargs)


def test_resolution_errors():
    with pytest.raises(ValueError, match="beyond max_steps=10"):
        CompressionSchedule(steps=[5, 11]).resolve(10)
    for unknown in (None, 0, -1):
        with pytest.raises(ValueError, match="needs a known run length"):
            CompressionSchedule().resolve(unknown)
    # explicit steps do not need the run length
    assert CompressionSchedule(steps=[4]).resolve(None) == [4]
