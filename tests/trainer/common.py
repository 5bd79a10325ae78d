"""Shared helpers of the Trainer-integration tests (tiny, CPU-only, quiet)."""

from __future__ import annotations

import copy

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from compressm_hf.trainer.surgery import base_optimizer

from .toy_ssm import CountingDataset, ToySSMConfig, ToySSMForCausalLM

SSM_PARAM_NAMES = ("nu_log", "theta", "B_re", "B_im", "C_re", "C_im")


def make_model(seed=0, state_sizes=(12, 12), reduction="balanced", **kwargs) -> ToySSMForCausalLM:
    torch.manual_seed(seed)
    return ToySSMForCausalLM(ToySSMConfig(state_sizes=list(state_sizes), reduction=reduction, **kwargs))


def make_args(output_dir, max_steps=30, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.01,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=5,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(model, args, callbacks, eval_dataset=None) -> Trainer:
    return Trainer(
        model=model,
        args=args,
        train_dataset=CountingDataset(size=64, seed=0),
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
    )


def ssm_params(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SSM_PARAM_NAMES
    }


def optimizer_state_by_name(model, optimizer) -> dict[str, dict]:
    opt = base_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {
            k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()
        }
        for p, st in opt.state.items()
    }


class Probe(TrainerCallback):
    """Records what a test needs: the events, and copies of the model/optimizer at given steps."""

    def __init__(self, snapshot_steps=(), on="step_end"):
        self.snapshot_steps = set(snapshot_steps)
        self.on = on
        self.events: list[tuple[str, int]] = []
        self.snapshots: dict[int, dict] = {}
        self.grads_at_step_end: dict[int, bool] = {}

    def _snap(self, state, model, optimizer):
        self.snapshots[state.global_step] = {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer_state_by_name(model, optimizer),
            "sizes": list(model.config.state_sizes),
            "groups": [[id(p) for p in g["params"]] for g in base_optimizer(optimizer).param_groups],
        }

    def on_substep_end(self, args, state, control, **kwargs):
        self.events.append(("substep", state.global_step))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.events.append(("step", state.global_step))
        self.grads_at_step_end[state.global_step] = any(p.grad is not None for p in model.parameters())
        if self.on == "step_end" and state.global_step in self.snapshot_steps:
            self._snap(state, model, optimizer)

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.events.append(("evaluate", state.global_step))
        if self.on == "evaluate" and state.global_step in self.snapshot_steps:
            self._snap(state, model, optimizer)
