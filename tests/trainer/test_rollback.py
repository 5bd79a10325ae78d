"""trainer/rollback.py and pragmatic mode: the pre-cut metric comes from the Trainer's own evaluation, so no
log entry of the compression step is lost; the rollback pieces on their own."""

from __future__ import annotations

import types

import pytest
import torch

from compressm_hf import RankPolicy, find_reducible_layers
from compressm_hf.engine import compress_model
from compressm_hf.trainer import CompreSSMCallback
from compressm_hf.trainer.callback import SNAPSHOT_NAME as FROM_CALLBACK
from compressm_hf.trainer.rollback import (
    SNAPSHOT_NAME,
    load_snapshot,
    metric_value,
    resolve_metric,
    restore_cut,
    rollback_event,
    save_snapshot,
    should_roll_back,
    snapshot_training_state,
)

from .common import make_args, make_model, make_trainer
from .toy_ssm import CountingDataset


def test_the_loss_of_the_compression_step_is_logged_in_pragmatic_mode(tmp_path):
    cb = CompreSSMCallback(mode="pragmatic", steps=[4], pragmatic_tolerance=10.0)
    args = make_args(tmp_path, max_steps=6, logging_steps=1, eval_strategy="steps", eval_steps=2)
    trainer = make_trainer(make_model(), args, [cb], eval_dataset=CountingDataset(size=16, seed=1))
    trainer.train()
    history = trainer.state.log_history
    assert sorted(h["step"] for h in history if "loss" in h) == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in history if "compressm/mean_state_size" in h] == [4]
    assert sorted(h["step"] for h in history if "eval_loss" in h) == [2, 4, 6]  # no extra evaluation
    assert [(e["kind"], e["step"]) for e in cb.history] == [("reduction", 4)] and cb.pending is None


def test_pragmatic_attempt_asks_the_trainer_for_the_evaluation(tmp_path):
    cb = CompreSSMCallback(mode="pragmatic", steps=[3], pragmatic_tolerance=10.0)
    args = make_args(tmp_path, max_steps=5, eval_strategy="steps", eval_steps=100)  # no scheduled eval at 3
    trainer = make_trainer(make_model(), args, [cb], eval_dataset=CountingDataset(size=16, seed=1))
    trainer.train()
    # 3: asked for by the attempt (the pre-cut metric); 5: the Trainer's own at the last step, which judges it
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [3, 5]
    assert [(e["kind"], e["step"]) for e in cb.history] == [("reduction", 3)] and cb.pending is None


def _args(**kw):
    base = dict(eval_strategy="steps", metric_for_best_model=None, greater_is_better=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_resolve_metric_names_and_directions():
    trainer = types.SimpleNamespace(eval_dataset=[1])
    assert resolve_metric(_args(), trainer, None, None) == ("eval_loss", False)
    assert resolve_metric(_args(), trainer, "accuracy", None) == ("eval_accuracy", True)
    assert resolve_metric(_args(), trainer, "loss", True) == ("eval_loss", True)
    best = _args(metric_for_best_model="eval_f1", greater_is_better=False)
    assert resolve_metric(best, trainer, None, None) == ("eval_f1", False)
    with pytest.raises(ValueError, match="eval_strategy"):
        resolve_metric(_args(eval_strategy="no"), trainer, None, None)
    with pytest.raises(ValueError, match="bind"):
        resolve_metric(_args(), None, None, None)
    with pytest.raises(ValueError, match="eval_dataset"):
        resolve_metric(_args(), types.SimpleNamespace(eval_dataset=None), None, None)


def test_metric_value_and_the_decision():
    assert metric_value({"eval_loss": 1.5}, "eval_loss") == 1.5
    with pytest.raises(KeyError, match="eval_acc.*'eval_loss'"):
        metric_value({"eval_loss": 1.5}, "eval_acc")
    assert should_roll_back(1.0, 1.2, greater=False, tolerance=0.1, step=5)  # loss rose by 0.2
    assert not should_roll_back(1.0, 1.05, greater=False, tolerance=0.1, step=5)
    assert should_roll_back(0.9, 0.7, greater=True, tolerance=0.1, step=5)  # accuracy fell by 0.2


def test_snapshot_restore_and_file_round_trip(tmp_path):
    assert FROM_CALLBACK == SNAPSHOT_NAME
    model = make_model(state_sizes=(12, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 12, (4, 6))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = snapshot_training_state(model, optimizer, find_reducible_layers(model))
    path = save_snapshot(snapshot, tmp_path)
    assert path.endswith(SNAPSHOT_NAME) and load_snapshot(tmp_path / "missing") is None
    loaded = load_snapshot(tmp_path)
    assert loaded["sizes"] == {0: 12, 1: 12}
    cut = compress_model(model, RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.25))
    assert cut.sizes_after == [9, 9] == model.config.state_sizes
    sizes = restore_cut(model, optimizer, loaded)
    assert sizes == ([9, 9], [12, 12]) and model.config.state_sizes == [12, 12]
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    state = types.SimpleNamespace(global_step=8, epoch=1.0)
    event = rollback_event(state, 6, "eval_loss", False, 1.0, 1.3, 0.1, sizes)
    assert event["kind"] == "rollback" and event["restored_step"] == 6 and event["sizes_after"] == [12, 12]
