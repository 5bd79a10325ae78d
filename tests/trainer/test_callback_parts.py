"""The pieces the callback delegates to, each on its own: the settings' constructor forms and uncuttable-layer
check, the exported state (callback_state), the state budget (state_budget), one cut in training
(distributed_cut), the pragmatic verdicts (rollback.judge_cut / resume_snapshot) and the protocol helpers."""

from __future__ import annotations

import types

import pytest
import torch

from compressm_hf import CompreSSMConfig, RankPolicy, find_reducible_layers
from compressm_hf.engine import plan_layers
from compressm_hf.modeling.mamba.modeling_common import ParamSwap as CopiedParamSwap
from compressm_hf.protocol import ParamSwap, as_param_swap, require_reducible_layers
from compressm_hf.trainer import CompreSSMCallback
from compressm_hf.trainer.callback_state import EXPORTED_ATTRIBUTES, export_state, restore_or_reset
from compressm_hf.trainer.distributed_cut import cut_in_training
from compressm_hf.trainer.report import reduction_event
from compressm_hf.trainer.rollback import judge_cut, resume_snapshot, save_snapshot, snapshot_training_state
from compressm_hf.trainer.state_budget import budget_total, plan_attempt
from compressm_hf.trainer.statistics import set_statistics

from .common import make_model, optimizer_state_by_name


def _trained(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


# ---------------------------------------------------------------- settings


def test_config_of_takes_a_config_keywords_a_bare_tau_or_nothing():
    config = CompreSSMConfig(tau=0.05)
    assert CompreSSMConfig.of(config) is config
    assert CompreSSMConfig.of(tau=0.05) == config == CompreSSMConfig.of(0.05)
    assert CompreSSMConfig.of() == CompreSSMConfig()
    with pytest.raises(TypeError, match="not both.*'gate'"):
        CompreSSMConfig.of(config, gate=0.9)
    with pytest.raises(TypeError, match="must be a CompreSSMConfig.*'0.05'"):
        CompreSSMConfig.of("0.05")
    with pytest.raises(TypeError, match="unknown CompreSSM setting.*'taus'"):
        CompreSSMConfig.of(taus=0.1)


def test_uncuttable_layers_names_the_setting_the_layer_and_its_size():
    layers = find_reducible_layers(make_model(state_sizes=(12, 6)))
    assert CompreSSMConfig().uncuttable_layers(layers) == []
    found = CompreSSMConfig(min_state_size=8).uncuttable_layers(layers)
    assert [key for key, _ in found] == [("min_state_size", 1)]
    assert "min_state_size=8 is not below layer 1's state size 6" in found[0][1]
    found = CompreSSMConfig(round_to=12).uncuttable_layers(layers)
    assert [key for key, _ in found] == [("round_to", 0), ("round_to", 1)]


# ---------------------------------------------------------------- exported state


def test_export_and_restore_round_trip_and_a_fresh_run_resets():
    cb = CompreSSMCallback(tau=0.2)
    cb.history, cb.done_steps, cb.original_sizes = [{"kind": "reduction", "step": 3}], [3], [12, 12]
    cb.stopped, cb.pending, cb.training_stopped = True, {"step": 3, "metric_before": 1.0}, "step 3: NaN"
    saved = export_state(cb)
    assert saved["args"] == cb.config.to_dict() and set(saved["attributes"]) == set(EXPORTED_ATTRIBUTES)
    other = CompreSSMCallback(**saved["args"])
    restore_or_reset(
        other, types.SimpleNamespace(global_step=5, stateful_callbacks={"CompreSSMCallback": saved})
    )
    assert {k: getattr(other, k) for k in EXPORTED_ATTRIBUTES} == saved["attributes"]
    restore_or_reset(other, types.SimpleNamespace(global_step=0, stateful_callbacks=None))
    assert other.history == [] and other.done_steps == [] and other.pending is None and not other.stopped
    with pytest.warns(UserWarning, match="resuming without a saved CompreSSMCallback state.*<= 7"):
        restore_or_reset(other, types.SimpleNamespace(global_step=7, stateful_callbacks={}))


# ---------------------------------------------------------------- state budget


def test_budget_total_from_a_total_or_a_mean_and_its_refusals():
    assert budget_total(CompreSSMConfig(), [12, 12]) is None
    assert budget_total(CompreSSMConfig(target_total_state=10), [12, 12]) == 10
    assert budget_total(CompreSSMConfig(target_mean_state=4.5), [12, 12]) == 9
    with pytest.raises(ValueError, match="target_total_state=3 is unreachable.*min_state_size=2.*total of 4"):
        budget_total(CompreSSMConfig(target_total_state=3, min_state_size=2), [12, 12])
    with pytest.warns(UserWarning, match="budget 30 is not below the model's total state size 24"):
        assert budget_total(CompreSSMConfig(target_total_state=30), [12, 12]) == 30


def test_plan_attempt_moves_geometrically_towards_the_budget():
    layers = find_reducible_layers(make_model(state_sizes=(12, 12)))
    config = CompreSSMConfig(target_total_state=6)
    first = plan_attempt(layers, config, step=2, steps=[2, 4], total=6, original_total=24)
    assert (
        first.budget["attempt"] == 1
        and first.budget["attempts"] == 2
        and first.budget["schedule"] == "geometric"
    )
    assert first.budget["attempt_target"] == 12  # 24 * (6 / 24) ** (1 / 2)
    assert sum(p.rank for p in first.plans.values()) <= 12
    last = plan_attempt(
        layers, config, step=9, steps=[2, 4], total=6, original_total=24
    )  # off-schedule: last
    assert last.budget["attempt"] == 2 and last.budget["attempt_target"] == 6


# ---------------------------------------------------------------- one cut in training


def test_cut_in_training_moves_the_optimizer_to_the_new_parameters():
    model = make_model(state_sizes=(12, 12))
    optimizer = _trained(model)
    policy = RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.25)
    cut = cut_in_training(model, optimizer, lambda layers: plan_layers(layers, policy, step=4), step=4)
    assert cut.event.sizes_after == [9, 9] == model.config.state_sizes and cut.event.layers_reduced == 2
    assert cut.optimizer_counts and cut.wall_time_s >= 0 and cut.cpu_time_s >= 0
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(swap.new) in params and id(swap.old) not in params for swap in cut.event.swaps)
    moments = optimizer_state_by_name(model, optimizer)
    assert all(v["exp_avg"].shape == p.shape for n, p in model.named_parameters() for v in [moments[n]])
    event = reduction_event(types.SimpleNamespace(global_step=4, epoch=0.5), cut, "slice")
    assert event["sizes_before"] == [12, 12] and event["sizes_after"] == [9, 9] and event["step"] == 4
    assert event["optimizer_counts"] == cut.optimizer_counts and "budget" not in event


def test_set_statistics_switches_only_layers_that_collect():
    class Collecting(torch.nn.Module):
        collect_statistics = False
        resets = 0

        def reset_statistics(self):
            self.resets += 1

    model = make_model()
    layers = find_reducible_layers(model)
    layers[0].__class__ = type("WithStats", (type(layers[0]), Collecting), {})
    set_statistics(model, True)
    assert layers[0].collect_statistics is True and not hasattr(layers[1], "collect_statistics")
    set_statistics(model, False, reset=True)
    assert layers[0].collect_statistics is False and layers[0].resets == 1


# ---------------------------------------------------------------- pragmatic verdicts


def _judge(pending, snapshot, value, model, optimizer, greater=False, tolerance=0.1):
    state = types.SimpleNamespace(global_step=8, epoch=1.0)
    kw = dict(state=state, model=model, optimizer=optimizer, wrapped=None, metric="eval_loss")
    return judge_cut(pending, snapshot, value, greater=greater, tolerance=tolerance, **kw)


def test_judge_cut_keeps_rolls_back_or_keeps_without_a_snapshot():
    model = make_model(state_sizes=(12, 12))
    optimizer = _trained(model)
    snapshot = snapshot_training_state(model, optimizer, find_reducible_layers(model))
    policy = RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.25)
    cut_in_training(model, optimizer, lambda layers: plan_layers(layers, policy, step=6), step=6)
    pending = {"step": 6, "metric_before": 1.0}
    assert _judge(pending, snapshot, 1.05, model, optimizer) == ("kept", None)
    with pytest.warns(UserWarning, match="should be rolled back.*snapshot is not available"):
        assert _judge(pending, None, 1.5, model, optimizer) == ("kept_without_snapshot", None)
    assert model.config.state_sizes == [9, 9]
    verdict, event = _judge(pending, snapshot, 1.5, model, optimizer)
    assert verdict == "rolled_back" and event["restored_step"] == 6 and event["sizes_after"] == [12, 12]
    assert model.config.state_sizes == [12, 12]


def test_resume_snapshot_reads_the_checkpoint_or_warns(tmp_path):
    model = make_model()
    snapshot = snapshot_training_state(model, _trained(model), find_reducible_layers(model))
    save_snapshot(snapshot, tmp_path / "checkpoint-8")
    assert resume_snapshot(str(tmp_path), 8, 6)["sizes"] == {0: 12, 1: 12}
    with pytest.warns(UserWarning, match=r"pragmatic cut \(step 6\) awaiting evaluation.*missing"):
        assert resume_snapshot(str(tmp_path), 9, 6) is None


# ---------------------------------------------------------------- protocol helpers


def test_as_param_swap_reads_every_form_and_refuses_others():
    old, new = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    keep = torch.tensor([0, 2])
    expected = ParamSwap(old, new, 0, keep)
    copied = CopiedParamSwap(old, new, 0, keep)  # the modeling files' copy: another NamedTuple type
    assert type(copied) is not ParamSwap and type(as_param_swap(copied)) is ParamSwap
    assert as_param_swap(copied) == expected and as_param_swap((old, new, 0, keep)).keep is keep
    with pytest.raises(TypeError, match="ParamSwap or an \\(old, new, state_dim, keep\\) tuple"):
        as_param_swap((old, new))


def test_require_reducible_layers_names_who_needs_them():
    assert len(require_reducible_layers(make_model(), "X")) == 2
    with pytest.raises(ValueError, match="X needs the model"):
        require_reducible_layers(None, "X")
    with pytest.raises(ValueError, match="Linear has no reducible SSM layer.*X has nothing to compress"):
        require_reducible_layers(torch.nn.Linear(2, 2), "X")
