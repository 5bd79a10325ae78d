"""Short runs warn once, before training, with what to change (ShortRunWarning); true warnings only."""

from __future__ import annotations

import warnings

import pytest
from transformers import TrainerControl, TrainerState

from compressm_hf import CompreSSMCallback
from compressm_hf.trainer.schedule import CompressionSchedule, ShortRunWarning

from .common import make_args, make_model, make_trainer


def _selective(model):
    """Make the toy layers look selective to the callback (they ignore the flag)."""
    for mixer in model.mixers:
        mixer.collect_statistics = False
    return model


def _short_run_warnings(callback, model, tmp_path, max_steps, **state) -> list[warnings.WarningMessage]:
    """Call only ``on_train_begin`` of ``callback`` for a ``max_steps`` run; the ShortRunWarnings it raised."""
    args = make_args(tmp_path, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(
            args, TrainerState(max_steps=max_steps, **state), TrainerControl(), model=model
        )
    return [w for w in caught if issubclass(w.category, ShortRunWarning)]


def test_a_200_step_run_warns_once_before_training_with_what_to_change(tmp_path):
    cb = CompreSSMCallback(tau=0.1)  # the default window: 4 attempts in the first 10% of the steps
    caught = _short_run_warnings(cb, _selective(make_model()), tmp_path, 200)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert cb.schedule_steps == [5, 10, 15, 20]
    for part in ("200-step run", "[5, 10, 15, 20]", "5 optimizer steps", "statistics_steps=8"):
        assert part in message, message
    # what to change: more steps (at which the schedule fits), a wider window, fewer statistics steps
    for fix in ("max_steps >= 318", "widen the window to (0, 0.16)", "statistics_steps=5"):
        assert fix in message, message
    assert CompressionSchedule(window=(0.0, 0.16)).short_run_advice(200, 8) is None
    assert CompressionSchedule().short_run_advice(318, 8) is None


def test_a_short_run_warns_once_over_the_whole_training(tmp_path):
    # three attempts 2 steps apart, fewer than statistics_steps=8: one warning, before the first step
    model = _selective(make_model(state_sizes=(6, 6)))
    cb = CompreSSMCallback(tau=0.3, steps=[2, 4, 6])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=7), [cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert cb.schedule_steps == [2, 4, 6]
    assert len([w for w in caught if issubclass(w.category, ShortRunWarning)]) == 1


def test_runs_that_fit_the_schedule_do_not_warn(tmp_path):
    model = _selective(make_model())
    assert _short_run_warnings(CompreSSMCallback(tau=0.1), model, tmp_path, 1000) == []
    # LTI layers need no statistics: attempts 5 steps apart are fine for them
    assert _short_run_warnings(CompreSSMCallback(tau=0.1), make_model(), tmp_path, 200) == []
    # other ranks stay quiet (rank 0 says it once for the run)
    quiet = _short_run_warnings(CompreSSMCallback(tau=0.1), model, tmp_path, 200, is_world_process_zero=False)
    assert quiet == []


def test_merged_attempts_warn_even_without_statistics(tmp_path):
    caught = _short_run_warnings(CompreSSMCallback(tau=0.1), make_model(), tmp_path, 20)
    assert len(caught) == 1
    assert "only 2 of the 4 attempts are distinct steps" in str(caught[0].message)


def test_explicit_steps_too_close_say_so():
    advice = CompressionSchedule(steps=[3, 6]).short_run_advice(100, 8)
    assert "space the explicit steps at least 8 apart" in advice and "statistics_steps=3" in advice
    assert CompressionSchedule(steps=[8, 16]).short_run_advice(100, 8) is None


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_mamba_on_cpu_does_not_ask_for_the_cuda_only_causal_conv1d(monkeypatch, arch):
    # transformers' Mamba helpers warn "`causal_conv1d` is not installed ... much slower" (warning_once) even
    # on CPU, where that CUDA-only package cannot run; our mixer calls the plain-torch helpers off CUDA
    import logging

    import torch

    from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)))
    torch.manual_seed(0)
    if arch == "mamba":
        model = CompreSSMMambaForCausalLM(
            CompreSSMMambaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, state_size=4)
        ).eval()
    else:
        from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

        config = CompreSSMMamba2Config(
            vocab_size=32,
            hidden_size=16,
            num_heads=4,
            head_dim=8,
            n_groups=1,
            num_hidden_layers=1,
            state_sizes=[4],
            eos_token_id=None,
        )
        model = CompreSSMMamba2ForCausalLM(config).eval()
    ids = torch.randint(1, 32, (1, 5))  # within both vocabularies
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=2, do_sample=False)  # the cached one-token path too
    assert not [m for m in said if "causal_conv1d" in m or "mamba_ssm" in m or "much slower" in m], said
