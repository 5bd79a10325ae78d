"""Numerical faults (NaN / unstable layers are skipped, the run goes on), bf16 autocast, run-to-run
determinism, and the refusal of FSDP1 / DeepSpeed (FSDP2 is supported)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

import compressm_hf.engine as engine_module
from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.callback import NonFiniteTrainingWarning
from compressm_hf.trainer.surgery import base_optimizer
from compressm_hf.trainer.trainer_lookup import unsupported_wrapper

from .common import make_args, make_model, make_trainer

lru = pytest.importorskip("compressm_hf.modeling.lru")


def _lru(seed=0, n=12):
    torch.manual_seed(seed)
    return lru.LRUForCausalLM(lru.LRUConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2, state_size=n))


def _mixers(model):
    return [m for m in model.modules() if isinstance(m, lru.LRUMixer)]


class Inject(TrainerCallback):
    """Before CompreSSMCallback at ``step``: write ``value`` into layer 0's ``nu_log[index]``; after the
    callback (``Restore``) optionally put the old values back (a transient fault)."""

    def __init__(self, step, value, index=slice(None)):
        self.step, self.value, self.index = step, value, index
        self.saved = None
        self.layer0_before_cut = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            mixer = _mixers(model)[0]
            with torch.no_grad():
                self.saved = mixer.nu_log.detach().clone()
                mixer.nu_log[self.index] = self.value
            self.layer0_before_cut = {n: p.detach().clone() for n, p in mixer.named_parameters()}


class Restore(TrainerCallback):
    def __init__(self, inject, restore=True):
        self.inject, self.restore = inject, restore
        self.layer0_after_cut = None
        self.params_after_cut = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.inject.step:
            mixer = _mixers(model)[0]
            self.layer0_after_cut = {n: p.detach().clone() for n, p in mixer.named_parameters()}
            opt = base_optimizer(optimizer)
            self.optimizer_matches = {id(p) for g in opt.param_groups for p in g["params"]} == {
                id(p) for p in model.parameters()
            }
            if self.restore:
                with torch.no_grad():
                    mixer.nu_log.copy_(self.inject.saved)


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


# nu_log=-30: |lambda| = exp(-exp(-30)) = 1 - 9e-14, finite but numerically marginal (non-finite parameters
# skip the whole attempt instead: test_lru_nan_parameter_skips_the_whole_attempt)
@pytest.mark.parametrize(
    ("value", "index", "restore", "error"),
    [
        (-30.0, 0, True, "UnstableSystemError"),  # transient: repaired after the attempt
        (-30.0, 0, False, "UnstableSystemError"),  # left in place
    ],
    ids=["unstable-transient", "unstable"],
)
def test_lru_bad_layer_is_skipped_and_training_goes_on(tmp_path, value, index, restore, error):
    model = _lru()
    inject = Inject(step=3, value=value, index=index)
    restore_cb = Restore(inject, restore=restore)
    losses = Losses()
    cb = CompreSSMCallback(tau=0.1, steps=[3, 6])
    args = make_args(tmp_path, max_steps=10, logging_steps=1, per_device_train_batch_size=4)
    trainer = make_trainer(model, args, [inject, cb, restore_cb, losses])
    with pytest.warns(UserWarning, match="layer 0 skipped"):
        trainer.train()

    first = cb.history[0]
    assert first["step"] == 3
    layer0, layer1 = first["layers"]
    assert not layer0["reduced"] and layer0["reason"].startswith(f"skipped: {error}")
    assert layer1["reduced"] and layer1["n_after"] < 12
    assert first["sizes_after"][0] == 12
    # the skipped layer was not touched by the callback (bit for bit, the fault included)
    for name, before in inject.layer0_before_cut.items():
        torch.testing.assert_close(restore_cb.layer0_after_cut[name], before, rtol=0, atol=0, equal_nan=True)
    assert restore_cb.optimizer_matches
    # training went on: every later loss is finite, the weights outside the faulty entry are finite
    assert losses.losses and all(math.isfinite(x) for x in losses.losses[3:])
    for name, p in model.named_parameters():
        finite = torch.isfinite(p)
        if not restore and name.endswith("layers.0.mixer.nu_log"):
            finite[index] = True
        assert bool(finite.all()), name
    sizes = [m.state_size for m in _mixers(model)]
    assert sizes == model.config.state_sizes and sizes[1] < 12
    report = read_report(tmp_path)
    assert report["events"][0]["layers"][0]["reason"].startswith("skipped")
    if restore:  # repaired: the next attempt reduces layer 0 normally
        assert cb.history[1]["layers"][0]["reduced"]
    else:  # still unstable: skipped again, never corrupted
        assert cb.history[1]["layers"][0]["reason"].startswith(f"skipped: {error}")
        assert sizes[0] == 12


def test_lru_nan_parameter_skips_the_whole_attempt(tmp_path):
    model = _lru()
    inject = Inject(step=3, value=float("nan"), index=3)
    restore_cb = Restore(inject, restore=True)  # a transient NaN, repaired after the attempt
    cb = CompreSSMCallback(tau=0.1, steps=[3, 6])
    args = make_args(tmp_path, max_steps=8, logging_steps=1, per_device_train_batch_size=4)
    trainer = make_trainer(model, args, [inject, cb, restore_cb])
    with pytest.warns(NonFiniteTrainingWarning, match=r"layers\.0\.mixer\.nu_log.*not compressed"):
        trainer.train()
    first, second = cb.history
    assert first["step"] == 3 and first["layers_reduced"] == 0 and first["sizes_after"] == [12, 12]
    assert "non-finite" in first["skipped"]
    # not a single layer was touched (the healthy one included)
    for name, before in inject.layer0_before_cut.items():
        torch.testing.assert_close(restore_cb.layer0_after_cut[name], before, rtol=0, atol=0, equal_nan=True)
    assert second["layers_reduced"] == 2 and "skipped" not in second
    assert read_report(tmp_path)["health"][0]["action"] == "skipped"


def test_bf16_autocast_cut_plans_in_float64_keeps_float32(tmp_path, monkeypatch):
    seen = []
    real = engine_module.plan_reduction

    def spy(system, policy, generator=None):
        seen.append((system.A.dtype, system.B.dtype, system.C.dtype))
        return real(system, policy, generator)

    monkeypatch.setattr(engine_module, "plan_reduction", spy)
    model = _lru()
    losses = Losses()
    cb = CompreSSMCallback(tau=0.1, steps=[2])
    args = make_args(tmp_path, max_steps=5, bf16=True, logging_steps=1, per_device_train_batch_size=4)
    trainer = make_trainer(model, args, [cb, losses])
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert seen and all(d in (torch.float64, torch.complex128) for dtypes in seen for d in dtypes)
    assert cb.history[0]["layers_reduced"] == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(x) for x in losses.losses)
    for mixer in _mixers(model):
        assert mixer.lti_system().A.dtype == torch.complex128


def test_same_seed_same_cuts_run_to_run(tmp_path):
    def once(tag):
        model = make_model(state_sizes=(12, 12))
        cb = CompreSSMCallback(tau=0.15, steps=[2, 4], selection="random")
        trainer = make_trainer(model, make_args(tmp_path / tag, max_steps=6), [cb])
        trainer.train()
        return cb.history, {k: v.detach().clone() for k, v in model.state_dict().items()}

    (h1, sd1), (h2, sd2) = once("a"), once("b")

    def strip(h):
        return [{k: v for k, v in e.items() if not k.endswith("time_s") and k != "layers"} for e in h] + [
            [{k: v for k, v in layer.items() if k != "wall_time_s"} for layer in e["layers"]] for e in h
        ]

    assert strip(h1) == strip(h2)
    assert any(e["layers_reduced"] for e in h1)
    assert sd1.keys() == sd2.keys()
    for k, v in sd1.items():
        assert torch.equal(v, sd2[k]), k


# ---------------------------------------------------------------------------------- FSDP / DeepSpeed


@pytest.fixture
def plain_trainer(tmp_path):
    model = make_model()
    cb = CompreSSMCallback(tau=0.1, steps=[2])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=4), [cb])
    return trainer, cb, model


def _fsdp_plugin(version):
    return types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=version))
    )


@pytest.mark.parametrize(
    ("flag", "value", "name"),
    [
        ("is_fsdp_enabled", True, "FSDP1"),  # no plugin to say which: FSDP1, as accelerate's default
        ("accelerator", _fsdp_plugin(1), "FSDP1"),
        ("is_deepspeed_enabled", True, "DeepSpeed"),
        ("args.fsdp", ["full_shard"], "FSDP1"),  # with fsdp_config version 1 (below)
        ("args.deepspeed", "ds_config.json", "DeepSpeed"),
    ],
)
@pytest.mark.parametrize("event", ["on_init_end", "on_train_begin"])
def test_fsdp1_and_deepspeed_are_refused(plain_trainer, flag, value, name, event):
    trainer, cb, model = plain_trainer
    target = trainer.args if flag.startswith("args.") else trainer
    setattr(target, flag.removeprefix("args."), value)
    if flag == "args.fsdp":
        trainer.args.fsdp_config = {"version": 1}
    cb.bind(trainer)
    state = TrainerState(max_steps=4)
    with pytest.raises(ValueError, match=rf"cannot run under {name}.*FSDP2.*DDP.*from_pretrained") as info:
        getattr(cb, event)(trainer.args, state, TrainerControl(), model=model, optimizer=None)
    assert "torchrun" in str(info.value) and "fsdp_version: 2" in str(info.value)


@pytest.mark.parametrize("how", ["plugin", "args", "args_default_version"])
def test_fsdp2_is_not_refused(plain_trainer, how):
    trainer, cb, model = plain_trainer
    if how == "plugin":
        trainer.accelerator = _fsdp_plugin(2)
    else:
        trainer.args.fsdp, trainer.args.fsdp_config = (
            ["full_shard"],
            ({"version": 2} if how == "args" else {}),
        )
    assert unsupported_wrapper(trainer, trainer.args) is None
    cb.bind(trainer).on_init_end(trainer.args, TrainerState(max_steps=4), TrainerControl(), model=model)


def test_plain_trainer_is_accepted(plain_trainer):
    trainer, cb, model = plain_trainer
    assert trainer.is_fsdp_enabled is False and trainer.is_deepspeed_enabled is False
    trainer.train()
    assert cb.history and cb.history[0]["step"] == 2
