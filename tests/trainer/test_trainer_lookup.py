"""trainer/trainer_lookup.py: the callback finds the Trainer of every transformers entry point, once, or fails
clearly under DDP."""

from __future__ import annotations

import types

import pytest
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

import compressm_hf.trainer.trainer_lookup as lookup
from compressm_hf.trainer import CompreSSMCallback
from compressm_hf.trainer.callback import _resume_checkpoint_on_stack, find_trainer
from compressm_hf.trainer.trainer_lookup import TrainerNotFoundError, resolve_trainer

from .common import make_args, make_model, make_trainer
from .toy_ssm import CountingDataset


class Seen(TrainerCallback):
    """What find_trainer() returns inside the events."""

    def __init__(self):
        self.found = {}

    def on_init_end(self, args, state, control, **kwargs):
        self.found["init_end"] = find_trainer()

    def on_train_begin(self, args, state, control, **kwargs):
        self.found["train_begin"] = find_trainer()


class MyTrainer(Trainer):
    """A user's Trainer subclass (overrides a method on the path, like TRL's trainers do)."""

    def training_step(self, *args, **kwargs):
        return super().training_step(*args, **kwargs)


def _run(trainer_cls, tmp_path, args=None):
    seen, cb = Seen(), CompreSSMCallback(tau=0.1, steps=[2])
    trainer = trainer_cls(
        model=make_model(state_sizes=(8, 8)),
        args=args or make_args(tmp_path, max_steps=3),
        train_dataset=CountingDataset(size=32, seed=0),
        callbacks=[seen, cb],
    )
    trainer.train()
    return trainer, seen, cb


@pytest.mark.parametrize("trainer_cls", [Trainer, MyTrainer], ids=["Trainer", "subclass"])
def test_the_trainer_is_found_for_trainer_and_a_subclass(tmp_path, trainer_cls):
    trainer, seen, cb = _run(trainer_cls, tmp_path)
    assert seen.found == {"init_end": trainer, "train_begin": trainer}
    assert cb.trainer is trainer and cb.history[0]["layers_reduced"] == 2
    assert any("compressm/mean_state_size" in h for h in trainer.state.log_history)  # logged via trainer.log


def test_the_trainer_is_found_for_seq2seq_trainer(tmp_path):
    args = Seq2SeqTrainingArguments(**make_args(tmp_path, max_steps=3).to_dict())
    trainer, seen, cb = _run(Seq2SeqTrainer, tmp_path, args=args)
    assert seen.found["train_begin"] is trainer and cb.trainer is trainer


def test_bind_overrides_the_stack(tmp_path):
    other = types.SimpleNamespace(log=lambda logs: None, model_wrapped=None)
    assert resolve_trainer(other, distributed=True) is other  # explicit binding wins, even under DDP
    cb = CompreSSMCallback(tau=0.1, steps=[2]).bind(other)
    make_trainer(make_model(state_sizes=(8, 8)), make_args(tmp_path, max_steps=3), [cb]).train()
    assert cb.trainer is other


def test_resume_checkpoint_and_trainer_from_the_stack_of_train():
    class Fake(Trainer):
        def __init__(self):  # no model needed: only the frames matter
            pass

        def train(self, resume_from_checkpoint=None):
            return find_trainer(), _resume_checkpoint_on_stack()

    fake = Fake()
    assert fake.train(resume_from_checkpoint="out/checkpoint-4") == (fake, "out/checkpoint-4")
    assert fake.train() == (fake, None)
    assert find_trainer() is None and _resume_checkpoint_on_stack() is None


def test_no_trainer_in_a_single_process_is_fine():
    assert resolve_trainer(None, distributed=False) is None


def test_no_trainer_under_ddp_is_a_clear_error_not_a_silent_divergence(monkeypatch):
    with pytest.raises(TrainerNotFoundError, match=r"world_size > 1.*bind\(trainer\)"):
        resolve_trainer(None, distributed=True)
    monkeypatch.setattr(lookup, "_multi_process", lambda: True)
    cb = CompreSSMCallback(tau=0.1, steps=[1])
    args = types.SimpleNamespace(output_dir=None)
    with pytest.raises(TrainerNotFoundError, match="silently diverge"):
        cb.on_train_begin(args, TrainerState(max_steps=4), TrainerControl(), model=make_model())
