"""CompreSSMCallback with a global state budget (target_total_state / target_mean_state) in a tiny Trainer run."""

from __future__ import annotations

import pytest

from compressm_hf import find_reducible_layers
from compressm_hf.budget import attempt_targets
from compressm_hf.trainer import CompreSSMCallback, read_report

from .common import make_args, make_model, make_trainer

STEPS = [4, 8, 12]


def _sizes(model):
    return [int(layer.state_size) for layer in find_reducible_layers(model)]


def _train(tmp_path, cb, reduction="balanced", max_steps=14):
    model = make_model(state_sizes=(16, 16), reduction=reduction)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=max_steps), [cb])
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("reduction", ["balanced", "modal"])
def test_total_budget_is_met_geometrically(tmp_path, reduction):
    cb = CompreSSMCallback(target_total_state=10, steps=STEPS)
    model, trainer = _train(tmp_path, cb, reduction)

    assert sum(_sizes(model)) == 10  # the final attempt aims at the budget itself
    budgets = [e["budget"] for e in cb.history]
    assert [b["attempt_target"] for b in budgets] == attempt_targets(32, 10, 3) == [21, 14, 10]
    for event, b in zip(cb.history, budgets):
        assert sum(event["sizes_after"]) == b["planned_total"] <= b["attempt_target"]
        assert b["met"] and 0.0 <= b["tau_interval"][0] <= b["tau"] < b["tau_interval"][1]
    taus = [b["tau"] for b in budgets]
    assert all(0.0 < tau < 1.0 for tau in taus)

    report = read_report(tmp_path)
    assert [e["budget"]["tau"] for e in report["events"]] == pytest.approx(taus)
    assert report["config"]["target_total_state"] == 10 and report["config"]["tau"] is None
    record = model.config.compression
    assert record["target_total_state"] == 10 and record["tau"] is None
    assert [e["tau"] for e in record["events"]] == pytest.approx(taus)
    logged = [h for h in trainer.state.log_history if "compressm/budget_tau" in h]
    assert [h["compressm/budget_target"] for h in logged] == [21, 14, 10]


def test_mean_budget_direct_schedule(tmp_path):
    cb = CompreSSMCallback(target_mean_state=4.5, budget_schedule="direct", steps=STEPS)
    model, _ = _train(tmp_path, cb)

    first, *later = cb.history
    assert first["budget"]["attempt_target"] == 9  # floor(4.5 * 2 layers)
    assert sum(first["sizes_after"]) == first["budget"]["planned_total"] <= 9
    assert sum(_sizes(model)) <= 9
    for event in later:  # already within the budget: no search, no cut
        assert event["budget"]["within_budget"] and event["budget"]["tau"] is None
        assert event["layers_reduced"] == 0
        assert {layer["reason"] for layer in event["layers"]} == {"budget met"}


def test_budget_rounding_and_min_state_size(tmp_path):
    cb = CompreSSMCallback(target_total_state=13, steps=STEPS, round_to=4, min_state_size=4)
    model, _ = _train(tmp_path, cb)
    sizes = _sizes(model)
    assert all(n % 4 == 0 and n >= 4 for n in sizes)
    assert sum(sizes) == 12  # the largest total of multiples of 4 that is <= 13


def test_unreachable_budget_raises_at_train_begin(tmp_path):
    cb = CompreSSMCallback(target_total_state=7, min_state_size=4, steps=STEPS)
    model = make_model(state_sizes=(16, 16))
    trainer = make_trainer(model, make_args(tmp_path, max_steps=14), [cb])
    with pytest.raises(ValueError, match=r"target_total_state=7 is unreachable.*below a total of 8"):
        trainer.train()
    assert _sizes(model) == [16, 16] and trainer.state.global_step == 0


def test_budget_not_below_the_model_warns(tmp_path):
    cb = CompreSSMCallback(target_total_state=40, steps=[2])
    with pytest.warns(UserWarning, match="nothing will be cut"):
        model, _ = _train(tmp_path, cb, max_steps=3)
    assert _sizes(model) == [16, 16]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tau=0.1, target_total_state=10), "either tau"),
        (dict(target_total_state=10, target_mean_state=5.0), "not both"),
        (dict(target_total_state=10, mode="fixed"), "mode='tolerance'"),
        (dict(target_total_state=10, mode="pragmatic"), "mode='tolerance'"),
        (dict(target_total_state=0), "target_total_state must be an int >= 1"),
        (dict(target_total_state=2.5), "target_total_state must be an int >= 1"),
        (dict(target_mean_state=float("nan")), "target_mean_state must be a finite number >= 1"),
        (dict(target_mean_state=0.5), "target_mean_state must be a finite number >= 1"),
        (dict(target_total_state=10, budget_schedule="linear"), "budget_schedule must be one of"),
    ],
)
def test_bad_budget_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompreSSMCallback(**kwargs)


def test_state_round_trip_keeps_the_budget():
    cb = CompreSSMCallback(target_mean_state=6.0, budget_schedule="direct", steps=STEPS)
    args = cb.state()["args"]
    rebuilt = CompreSSMCallback(**args)
    assert (rebuilt.target_mean_state, rebuilt.target_total_state, rebuilt.budget_schedule) == (
        6.0,
        None,
        "direct",
    )
    assert rebuilt.tau is None
