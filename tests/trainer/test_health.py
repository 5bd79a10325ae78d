"""trainer/health.py: the checks that keep a diverged or signal-free run from being compressed (unit level;
the callback-level tests are in test_hardening.py)."""

from __future__ import annotations

import types

import pytest
import torch

from compressm_hf.trainer.callback import NonFiniteTrainingWarning as FromCallback
from compressm_hf.trainer.health import (
    HealthCheck,
    NonFiniteTrainingWarning,
    gradient_is_zero,
    health_entry,
    health_message,
    nonfinite_parameters,
    skipped_event,
    warn_health,
)

from .common import make_model


def _state(step, losses=()):
    history = [{"loss": v, "step": s} for s, v in losses]
    return types.SimpleNamespace(global_step=step, log_history=history, epoch=0.5)


def test_nonfinite_parameters_names_only_trainable_broken_ones():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[1].bias[0] = float("inf")
    assert nonfinite_parameters(model) == ["0.weight", "1.bias"]
    model[1].bias.requires_grad_(False)  # frozen: not the run's business
    assert nonfinite_parameters(model) == ["0.weight"]


def test_gradient_is_zero():
    model = torch.nn.Linear(3, 1)
    assert gradient_is_zero(model)  # no gradient at all
    model(torch.ones(1, 3)).sum().mul(0.0).backward()
    assert gradient_is_zero(model)
    model(torch.ones(1, 3)).sum().backward()
    assert not gradient_is_zero(model)


def test_health_check_finds_each_problem_once():
    model = make_model(state_sizes=(4, 4))
    check = HealthCheck(checked_step=0)
    assert check.problems(model, _state(2, [(1, 1.0), (2, 0.9)]), at_attempt=True) == []
    # losses logged since the previous check only: step 2's are not looked at again
    found = check.problems(model, _state(4, [(1, float("nan")), (3, float("nan"))]), at_attempt=False)
    assert found == ["non-finite training loss logged at step(s) 3"]
    assert check.problems(model, _state(6, [(5, 0.0), (6, 0.0)]), at_attempt=True)[0].startswith(
        "the training loss is exactly 0"
    )
    check.zero_gradient_at[8] = True
    assert "gradient is exactly zero" in check.problems(model, _state(8), at_attempt=True)[0]
    assert 8 not in check.zero_gradient_at
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    assert (
        "non-finite values (NaN/Inf) in 1 trainable" in check.problems(model, _state(9), at_attempt=False)[0]
    )


def test_messages_entries_and_the_skipped_event():
    assert FromCallback is NonFiniteTrainingWarning  # still importable from the callback module
    assert "stopping the training" in health_message(3, "attempt", "stopped", ["x"])
    assert "at the end of training" in health_message(3, "train_end", "warned", ["x"])
    assert health_entry(3, "attempt", "skipped", ["x"]) == {
        "step": 3,
        "at": "attempt",
        "action": "skipped",
        "problems": ["x"],
    }
    with pytest.warns(NonFiniteTrainingWarning, match="step 3: a; b"):
        warn_health(3, "attempt", "skipped", ["a", "b"])
    model = make_model(state_sizes=(4, 6))
    from compressm_hf import find_reducible_layers

    event = skipped_event(_state(3), find_reducible_layers(model), "broken", "slice")
    assert event["skipped"] == "broken" and event["sizes_after"] == [4, 6] and event["layers_reduced"] == 0
    assert [r["reason"] for r in event["layers"]] == ["skipped: broken"] * 2
