"""Hardening of CompreSSMCallback: non-finite / no-signal training is never compressed (and is reported),
argument validation (``report_name``, ``on_nonfinite``), warnings for ``min_state_size``/``round_to`` that
can never cut, the training-loss log entry kept at compression steps, and clear errors when the callback's
own files cannot be written (full disk)."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback

import compressm_hf.trainer.report as report_module
from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.callback import SNAPSHOT_NAME, NonFiniteTrainingWarning

from .common import make_args, make_model, make_trainer
from .toy_ssm import CountingDataset, ToySSMForCausalLM

# ------------------------------------------------------------------------------------ non-finite training


class ScaledToySSM(ToySSMForCausalLM):
    """The toy LM with one float feature per sample (``scale``) multiplying its embeddings."""

    def forward(self, input_ids=None, labels=None, scale=None, **kwargs):
        if scale is None:
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        h = self.embed(input_ids) * scale.to(self.embed.weight.dtype)[:, None, None]
        for mixer in self.mixers:
            h = h + torch.tanh(mixer(h))
        logits = self.lm_head(h)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        return {"loss": loss, "logits": logits}


class NaNFeatureDataset(CountingDataset):
    """CountingDataset with a ``scale`` feature that is 1.0 except one NaN sample."""

    def __init__(self, nan_index=10, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.ones(self.ids.shape[0])
        self.scale[nan_index] = float("nan")

    def __getitem__(self, i):
        return {**super().__getitem__(i), "scale": self.scale[i]}


def _nan_feature_trainer(tmp_path, cb, max_steps=10):
    torch.manual_seed(0)
    model = ScaledToySSM(make_model().config)
    args = make_args(tmp_path, max_steps=max_steps, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=NaNFeatureDataset(size=64), callbacks=[cb])
    return trainer, model


def test_nan_feature_in_data_is_noticed_never_compressed_and_reported(tmp_path):
    # one epoch is 8 steps: the NaN sample has been trained on before the attempts at 9 and 10
    cb = CompreSSMCallback(tau=0.1, steps=[9, 10])
    trainer, model = _nan_feature_trainer(tmp_path, cb)
    with pytest.warns(NonFiniteTrainingWarning, match=r"non-finite.*not compressed") as record:
        result = trainer.train()
    # the premise: the Trainer's NaN/Inf filter hides it in the logged loss, the weights are all NaN
    assert math.isfinite(result.training_loss)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert not torch.isfinite(model.lm_head.weight).any()
    # ... and the callback noticed: no cut, every attempt skipped with the reason, at the end too
    assert model.config.state_sizes == [12, 12]
    assert [e["step"] for e in cb.history] == [9, 10]
    for event in cb.history:
        assert event["layers_reduced"] == 0 and event["sizes_after"] == [12, 12]
        assert "non-finite" in event["skipped"] and "embed.weight" in event["skipped"]
        assert all(la["reason"].startswith("skipped: non-finite") for la in event["layers"])
    assert any("end of training" in str(w.message) for w in record)
    report = read_report(tmp_path)
    assert report["final_sizes"] == [12, 12]
    assert [(h["step"], h["at"], h["action"]) for h in report["health"]] == [
        (9, "attempt", "skipped"),
        (10, "attempt", "skipped"),
        (10, "train_end", "warned"),
    ]
    assert report["training_stopped"] is None


def test_on_nonfinite_stop_stops_training_and_records_why(tmp_path):
    cb = CompreSSMCallback(tau=0.1, steps=[9, 10], on_nonfinite="stop")
    trainer, model = _nan_feature_trainer(tmp_path, cb, max_steps=12)
    with pytest.warns(NonFiniteTrainingWarning, match="stopping the training"):
        trainer.train()
    assert trainer.state.global_step == 9
    assert model.config.state_sizes == [12, 12]
    report = read_report(tmp_path)
    assert report["health"][0]["action"] == "stopped" and report["health"][0]["step"] == 9
    assert "non-finite" in report["training_stopped"]
    assert cb.state()["args"]["on_nonfinite"] == "stop"


def test_nonfinite_loss_in_log_history_is_noticed(tmp_path):
    # without the Trainer's NaN filter the logged loss itself is NaN
    cb = CompreSSMCallback(tau=0.1, steps=[9])
    trainer, model = _nan_feature_trainer(tmp_path, cb)
    trainer.args.logging_nan_inf_filter = False
    with pytest.warns(NonFiniteTrainingWarning):
        trainer.train()
    assert "non-finite training loss" in cb.history[0]["skipped"]


def test_huge_learning_rate_logs_loss_zero_with_nan_weights_and_is_not_compressed(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[4, 6])
    args = make_args(tmp_path, max_steps=6, logging_steps=1, learning_rate=1e4, max_grad_norm=0.0)
    trainer = make_trainer(model, args, [cb])
    with pytest.warns(NonFiniteTrainingWarning, match="non-finite"):
        trainer.train()
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h][3:] == [0.0, 0.0, 0.0]
    assert model.config.state_sizes == [12, 12]
    assert all("non-finite values" in e["skipped"] for e in cb.history)


class PoisonAt(TrainerCallback):
    """Writes NaN into ``lm_head.bias`` at the end of optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.bias[0] = float("nan")


def test_nonfinite_after_the_last_attempt_is_reported_at_train_end(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=5), [cb, PoisonAt(5)])
    with pytest.warns(NonFiniteTrainingWarning, match=r"end of training.*lm_head.bias"):
        trainer.train()
    assert cb.history[0]["layers_reduced"] > 0 and "skipped" not in cb.history[0]
    report = read_report(tmp_path)
    assert [(h["step"], h["at"], h["action"]) for h in report["health"]] == [(5, "train_end", "warned")]


def test_sequence_length_one_has_no_targets_and_is_not_compressed(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2, 4])
    args = make_args(tmp_path, max_steps=6, logging_steps=1)
    trainer = Trainer(
        model=model, args=args, train_dataset=CountingDataset(size=64, length=1), callbacks=[cb]
    )
    with pytest.warns(NonFiniteTrainingWarning, match="learned nothing"):
        trainer.train()
    assert model.config.state_sizes == [12, 12]
    assert [e["step"] for e in cb.history] == [2, 4]
    for event in cb.history:
        assert "gradient is exactly zero" in event["skipped"]
    assert "loss is exactly 0" in cb.history[1]["skipped"]  # step 1 and 3 logged loss 0.0
    report = read_report(tmp_path)
    assert [h["action"] for h in report["health"]] == ["skipped", "skipped"]


def test_healthy_run_has_no_health_entries(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2, 4])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=6, logging_steps=1), [cb])
    trainer.train()
    assert all("skipped" not in e for e in cb.history) and cb.history[0]["layers_reduced"] > 0
    assert read_report(tmp_path)["health"] == []


@pytest.mark.parametrize("value", ["raise", "", None, 1, "WARN"])
def test_bad_on_nonfinite(value):
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('warn', 'stop'\), got"):
        CompreSSMCallback(tau=0.1, on_nonfinite=value)


# ------------------------------------------------------------------------------------ small ones


@pytest.mark.parametrize(
    "name",
    [123, None, b"r.json", "", "../x.json", "a/b.json", "/tmp/r.json", "..", ".", "r.txt", "a\\b.json"],
)
def test_bad_report_name_is_refused_at_construction(name):
    with pytest.raises(ValueError, match=r"report_name must be a plain file name ending in \.json.*got"):
        CompreSSMCallback(tau=0.1, report_name=name)


def test_custom_report_name_is_used(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2], report_name="cuts.json")
    make_trainer(model, make_args(tmp_path, max_steps=3), [cb]).train()
    assert read_report(tmp_path / "cuts.json")["events"][0]["step"] == 2
    assert not (tmp_path / "compression_report.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_state_size": 8}, r"min_state_size=8 .*layer 1.*state size 6"),
        ({"round_to": 16}, r"round_to=16 .*layer 0.*state size 12"),
    ],
)
def test_min_state_size_or_round_to_beyond_the_state_warns(tmp_path, kwargs, match):
    model = make_model(state_sizes=(12, 6))
    cb = CompreSSMCallback(tau=0.1, steps=[2, 3], **kwargs)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=4), [cb])
    with pytest.warns(UserWarning, match=match) as record:
        trainer.train()
    messages = [str(w.message) for w in record if "can never be cut" in str(w.message)]
    assert len(messages) == len(set(messages))  # once per layer, not at every attempt


def test_sensible_min_state_size_and_round_to_do_not_warn(tmp_path, recwarn):
    model = make_model(state_sizes=(12, 6))
    cb = CompreSSMCallback(tau=0.1, steps=[2], min_state_size=4, round_to=2)
    make_trainer(model, make_args(tmp_path, max_steps=3), [cb]).train()
    assert not [w for w in recwarn if "can never be cut" in str(w.message)]


def test_training_loss_is_logged_at_compression_steps(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2, 4])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=6, logging_steps=1), [cb])
    trainer.train()
    history = trainer.state.log_history
    assert sorted(h["step"] for h in history if "loss" in h) == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in history if "compressm/mean_state_size" in h] == [2, 4]


def _failing(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _trained_with_one_cut(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=3), [cb])
    trainer.train()
    return model, cb, trainer


def test_full_disk_while_writing_the_report_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    model, cb, trainer = _trained_with_one_cut(tmp_path)
    target = tmp_path / "compression_report.json"
    before = target.read_text()
    monkeypatch.setattr(
        report_module.json, "dump", _failing(OSError(errno.ENOSPC, "No space left on device"))
    )
    with pytest.raises(OSError, match=r"disk is full") as info:
        cb.on_train_end(trainer.args, trainer.state, trainer.control, model=model)
    assert str(target) in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["compression_report.json"]  # no temporary file left


def test_torch_save_failure_of_the_snapshot_says_the_write_failed(tmp_path, monkeypatch):
    model, cb, trainer = _trained_with_one_cut(tmp_path)
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    cb.pending, cb._snapshot = {"step": 2, "metric_before": 1.0, "sizes_before": [12, 12]}, {"sizes": {}}
    inline = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")
    monkeypatch.setattr(torch, "save", _failing(inline))
    with pytest.raises(
        OSError, match=r"could not write .*compressm_pragmatic_snapshot.pt.*disk.*full"
    ) as info:
        cb.on_save(trainer.args, trainer.state, trainer.control, model=model)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert json.loads((checkpoint / "compression_report.json").read_text())["events"]
    assert sorted(os.listdir(checkpoint)) == ["compression_report.json"]
    assert not (checkpoint / SNAPSHOT_NAME).exists()


def test_state_args_rebuild_an_equivalent_callback():
    cb = CompreSSMCallback(tau=0.1, steps=[2], on_nonfinite="stop", statistics_steps=3, report_name="r.json")
    clone = CompreSSMCallback(**cb.state()["args"])
    assert clone.config_dict() == cb.config_dict()
    assert (clone.on_nonfinite, clone.statistics_steps, clone.report_name) == ("stop", 3, "r.json")
