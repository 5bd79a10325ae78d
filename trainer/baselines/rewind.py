"""Baseline 5: train, prune states, retrain -- with learning-rate rewinding or weight rewinding.

Renda, Frankle & Carbin (ICLR 2020), at the granularity of SSM states:

1. train the full model for ``T`` steps (record the weights at step ``k`` with :class:`WeightSnapshotCallback`
   for weight rewinding);
2. cut each layer to its target size, keeping the states with the highest score (:func:`state_scores`:
   per-state Hankel importance ``sqrt(P_ii Q_ii)`` of the diagonal system, or parameter magnitude) --
   :func:`prune_states_` (a modal plan with ``keep``: exact slices);
3. retrain for ``T - k`` steps with :class:`RewindTrainer`, whose LR schedule is the original one *rewound* to
   step ``k`` (it replays the schedule's values from ``k`` to ``T``):

   * **LR rewinding**: start from the final (pruned) weights;
   * **weight rewinding** (lottery-ticket style): first :func:`rewind_weights_` -- every weight goes back to its
     value at step ``k``, sliced to the kept states.

Iterating 2-3 (several rounds, each cutting part of the way) is done by calling them again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback
from transformers.optimization import get_scheduler

from compressm_hf import modal_importance
from compressm_hf.protocol import find_reducible_layers

from ._common import as_sizes, modal_plan, per_state_sum, reduce_layers_, state_params

CRITERIA = ("hsv", "magnitude")


@torch.no_grad()
def state_scores(layer: torch.nn.Module, criterion: str = "hsv") -> torch.Tensor:
    """``(n,)`` float64 importance of each state of a layer.

    ``"hsv"``: modal Hankel importance of the layer's (diagonal) system, summed over leading dimensions;
    ``"magnitude"``: ``sum |param|`` over the entries of the state's parameters (``_common.per_state_sum``).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    n = int(layer.state_size)
    if criterion == "hsv":
        system = layer.lti_system()
        if not system.diagonal:
            raise ValueError(f"layer {layer.layer_idx}: the 'hsv' criterion needs a diagonal system")
        return modal_importance(system.A, system.B, system.C).reshape(-1, n).sum(0).cpu()
    return per_state_sum(layer, lambda p: p.detach().abs())


@torch.no_grad()
def prune_states_(
    model: torch.nn.Module,
    target: int | float | Sequence[int],
    criterion: str = "hsv",
    optimizer=None,
) -> dict[int, torch.Tensor]:
    """Cut every reducible layer to ``target`` (sizes list, int or kept fraction), keeping its highest-scoring
    states. Returns ``layer_idx -> keep`` (sorted original indices) for the layers that were cut."""
    layers = find_reducible_layers(model)
    sizes = as_sizes(target, [int(layer.state_size) for layer in layers])
    plans = {}
    for layer, size in zip(layers, sizes):
        if size < int(layer.state_size):
            plans[int(layer.layer_idx)] = modal_plan(state_scores(layer, criterion), size)
    reduce_layers_(model, plans, optimizer=optimizer)
    return {idx: plan.keep for idx, plan in plans.items()}


class WeightSnapshotCallback(TrainerCallback):
    """Keep a CPU copy of ``model.state_dict()`` after optimizer step ``step`` (``0``: at the start of training);
    read it from ``self.snapshot``."""

    def __init__(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step = step
        self.snapshot: dict[str, torch.Tensor] | None = None

    def _take(self, model) -> None:
        self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.step == 0:
            self._take(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if int(state.global_step) == self.step:
            self._take(model)


@torch.no_grad()
def rewind_weights_(
    model: torch.nn.Module, snapshot: dict[str, torch.Tensor], keeps: dict[int, torch.Tensor]
) -> None:
    """Load ``snapshot`` (a state dict of the *unpruned* model) into the pruned ``model``: every state parameter
    of a cut layer is sliced to that layer's ``keep`` along its state axis, everything else is copied as is."""
    snap = dict(snapshot)
    for name, module in model.named_modules():
        if not (callable(getattr(module, "reduce_", None)) and hasattr(module, "layer_idx")):
            continue
        keep = keeps.get(int(module.layer_idx))
        if keep is None:
            continue
        prefix = f"{name}." if name else ""
        for pname, (_, dim) in state_params(module).items():
            key = prefix + pname
            if key in snap:
                snap[key] = snap[key].index_select(dim, torch.as_tensor(keep, dtype=torch.long))
    model.load_state_dict(snap, strict=True)


class RewindTrainer(Trainer):
    """A :class:`transformers.Trainer` whose LR schedule is the schedule of an earlier run of
    ``schedule_total_steps`` optimizer steps, rewound to ``rewind_to_step`` (Renda et al. 2020): retraining step
    ``s`` uses the learning rate the original run had at step ``rewind_to_step + s``.

    The original schedule is ``args.lr_scheduler_type`` with ``args.get_warmup_steps(schedule_total_steps)``;
    for the rewound LR to be the full-run LR, pass the same ``TrainingArguments`` (except ``max_steps``, usually
    ``schedule_total_steps - rewind_to_step``).
    """

    def __init__(self, *args, rewind_to_step: int, schedule_total_steps: int, **kwargs):
        if not 0 <= int(rewind_to_step) <= int(schedule_total_steps):
            raise ValueError(
                f"need 0 <= rewind_to_step <= schedule_total_steps, got {rewind_to_step}, {schedule_total_steps}"
            )
        super().__init__(*args, **kwargs)
        self.rewind_to_step = int(rewind_to_step)
        self.schedule_total_steps = int(schedule_total_steps)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            base_lrs = [g["lr"] for g in optimizer.param_groups]
            # only used to read the original schedule's multiplier; restored right after
            probe_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            probe = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=probe_opt,
                num_warmup_steps=self.args.get_warmup_steps(self.schedule_total_steps),
                num_training_steps=self.schedule_total_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            if not isinstance(probe, LambdaLR):
                raise ValueError(
                    f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not a LambdaLR schedule; cannot rewind it"
                )
            original = probe.lr_lambdas[0]
            offset = self.rewind_to_step
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr
            self.lr_scheduler = LambdaLR(optimizer, lambda s: original(s + offset))
            self._created_lr_scheduler = True
        return self.lr_scheduler


def original_lr(args, schedule_total_steps: int, step: int) -> float:
    """The learning rate a run with ``args`` over ``schedule_total_steps`` steps uses at optimizer step ``step``."""
    probe_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    sched = get_scheduler(
        args.lr_scheduler_type,
        optimizer=probe_opt,
        num_warmup_steps=args.get_warmup_steps(schedule_total_steps),
        num_training_steps=schedule_total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return args.learning_rate * sched.lr_lambdas[0](step)


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (the pruned student of a rewinding round must not alias the trained full model)."""
    return copy.deepcopy(model)
