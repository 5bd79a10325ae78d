"""CompreSSMCallback on the selective (Mamba) models, and skipping layers whose system is broken."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.callback import NonFiniteTrainingWarning
from compressm_hf.trainer.surgery import base_optimizer

from .common import make_args, make_trainer

mamba = pytest.importorskip("compressm_hf.modeling.mamba")


def _mamba(seed=0, n=16):
    torch.manual_seed(seed)
    config = mamba.CompreSSMMambaConfig(
        vocab_size=12, hidden_size=16, num_hidden_layers=2, state_size=n, expand=2, conv_kernel=2
    )
    return mamba.CompreSSMMambaForCausalLM(config)


def test_mamba_statistics_window_and_cut(tmp_path):
    model = _mamba()
    seen = []

    def spy(module, args, output):
        seen.append(bool(module.collect_statistics))

    mixers = [m for m in model.modules() if isinstance(m, mamba.CompreSSMMambaMixer)]
    handle = mixers[0].register_forward_hook(spy)
    cb = CompreSSMCallback(tau=0.3, steps=[6, 12], statistics_steps=3)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=16), [cb])
    trainer.train()
    handle.remove()

    # statistics were collected exactly in the 3 optimizer steps before each attempt
    assert seen == [s in {4, 5, 6, 10, 11, 12} for s in range(1, 17)]
    assert not any(m.collect_statistics for m in mixers)
    report = read_report(tmp_path)
    first = report["events"][0]["layers"]
    assert all(layer.get("rule", "modal") == "modal" for layer in first)
    sizes = model.config.state_sizes
    assert sizes == [m.state_size for m in mixers]
    assert all(n < 16 for n in sizes), sizes
    # the optimizer holds exactly the live parameters (no stale A_log / x_proj tensors)
    opt = base_optimizer(trainer.optimizer)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert opt.state[mixers[0].A_log]["exp_avg"].shape == mixers[0].A_log.shape


class _AtStep(TrainerCallback):
    """Runs ``action()`` at the end of optimizer step ``step`` (before the callbacks after it)."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.action()


def test_layer_without_statistics_is_skipped_and_training_goes_on(tmp_path):
    model = _mamba(n=8)
    mixers = [m for m in model.modules() if isinstance(m, mamba.CompreSSMMambaMixer)]
    cb = CompreSSMCallback(tau=0.3, steps=[4], statistics_steps=2)
    # drop layer 1's surrogate statistics right before the attempt: its system cannot be built
    trainer = make_trainer(
        model, make_args(tmp_path, max_steps=8), [_AtStep(4, mixers[1].reset_statistics), cb]
    )
    with pytest.warns(UserWarning, match="layer 1 skipped"):
        trainer.train()
    layers = read_report(tmp_path)["events"][0]["layers"]
    assert layers[1]["n_after"] == layers[1]["n_before"] == 8
    assert layers[1]["reason"].startswith("skipped: MissingStatisticsError")
    assert mixers[0].state_size < 8


def test_nan_parameter_skips_the_whole_attempt(tmp_path):
    model = _mamba(n=8)
    mixers = [m for m in model.modules() if isinstance(m, mamba.CompreSSMMambaMixer)]
    cb = CompreSSMCallback(tau=0.3, steps=[4], statistics_steps=2)

    def poison():  # one NaN in layer 1 at step 3: the update of step 4 spreads it to every weight
        mixers[1].A_log[0, 0] = float("nan")

    trainer = make_trainer(model, make_args(tmp_path, max_steps=8), [_AtStep(3, poison), cb])
    with pytest.warns(NonFiniteTrainingWarning, match=r"non-finite.*mixer\.A_log.*not compressed"):
        trainer.train()
    event = read_report(tmp_path)["events"][0]
    assert "non-finite" in event["skipped"] and event["sizes_after"] == [8, 8]
    assert [m.state_size for m in mixers] == [8, 8]
