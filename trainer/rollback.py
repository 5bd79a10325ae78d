"""Pragmatic mode's rollback: keep the pre-cut state until an evaluation judges the cut.

At an attempt ``CompreSSMCallback(mode="pragmatic")`` asks the Trainer for an evaluation
(``control.should_evaluate = True``, the Trainer's normal path, so every log entry of the step is kept)
and, in ``on_evaluate``, takes CPU copies of the model and optimizer (:func:`snapshot_training_state`),
then cuts. The next evaluation (or the next attempt's) compares the metric with the pre-cut one:
a drop larger than the tolerance restores the snapshot exactly (:func:`restore_cut`) and cutting stops.
The snapshot of a cut still awaiting its evaluation is saved into every checkpoint
(:data:`SNAPSHOT_NAME`) so that a resumed run can still roll it back.
"""

from __future__ import annotations

import os

import torch

from compressm_hf.engine import check_state_sizes
from compressm_hf.protocol import find_reducible_layers

from .report import save_torch_atomic
from .surgery import (
    broadcast_objects,
    rebuild_ddp_in_place_,
    restore_training_state,
    snapshot_training_state,
)

__all__ = [
    "SNAPSHOT_NAME",
    "load_snapshot",
    "metric_value",
    "resolve_metric",
    "restore_cut",
    "rollback_event",
    "save_snapshot",
    "should_roll_back",
    "snapshot_training_state",
]

SNAPSHOT_NAME = "compressm_pragmatic_snapshot.pt"


def resolve_metric(args, trainer, metric: str | None, greater_is_better: bool | None) -> tuple[str, bool]:
    """``(metric name with the eval_ prefix, greater is better)`` of a pragmatic run; check it can evaluate.

    The metric: ``metric`` (the callback's ``metric_for_pragmatic``), else ``args.metric_for_best_model``, else
    ``"eval_loss"``. The direction: ``greater_is_better`` if given; else ``args.greater_is_better`` when the
    metric is ``args.metric_for_best_model``; else False for names ending in ``loss``/``perplexity``/``error``.

    Raises:
        ValueError: no evaluation strategy, no Trainer found, or no ``eval_dataset`` on it.
    """
    strategy = getattr(args, "eval_strategy", None)
    if strategy is None or str(getattr(strategy, "value", strategy)) == "no":
        raise ValueError(
            "mode='pragmatic' compares an evaluation metric before and after each cut: set "
            "TrainingArguments(eval_strategy='steps', eval_steps=...) and pass an eval_dataset"
        )
    if trainer is None:
        raise ValueError(
            "mode='pragmatic' evaluates before each cut and needs the Trainer, which was not found on the "
            "call stack; call CompreSSMCallback.bind(trainer)"
        )
    if getattr(trainer, "eval_dataset", None) is None:
        raise ValueError("mode='pragmatic' needs an eval_dataset on the Trainer")
    metric = metric or args.metric_for_best_model or "eval_loss"
    if not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    if greater_is_better is not None:
        return metric, bool(greater_is_better)
    best = args.metric_for_best_model
    best = None if best is None else (best if best.startswith("eval_") else f"eval_{best}")
    if best == metric and args.greater_is_better is not None:
        return metric, bool(args.greater_is_better)
    return metric, not metric.endswith(("loss", "perplexity", "error"))


def metric_value(metrics: dict | None, metric: str) -> float:
    """``metrics[metric]`` as a float, or a KeyError naming the metrics the evaluation returned."""
    metrics = metrics or {}
    if metric not in metrics:
        raise KeyError(
            f"pragmatic mode compares {metric!r}, but the evaluation returned {sorted(metrics)}; set "
            "metric_for_pragmatic to one of those"
        )
    return float(metrics[metric])


def should_roll_back(before: float, value: float, greater: bool, tolerance: float, step: int) -> bool:
    """Whether the metric dropped by more than ``tolerance`` since the cut (rank 0 decides for every rank)."""
    drop = (before - value) if greater else (value - before)
    (rollback,) = broadcast_objects([bool(drop > tolerance)], what=f"the rollback decision of step {step}")
    return rollback


def restore_cut(model, optimizer, snapshot: dict, wrapped=None) -> tuple[list[int], list[int]]:
    """Undo a cut exactly (weights, sizes, optimizer state; DDP ``wrapped`` rebuilt); ``(sizes before, after)``."""
    layers = find_reducible_layers(model)
    sizes_before = [int(layer.state_size) for layer in layers]
    restore_training_state(model, optimizer, layers, snapshot)
    if wrapped is not None and wrapped is not model:
        rebuild_ddp_in_place_(wrapped)
    return sizes_before, check_state_sizes(model, layers)


def rollback_event(
    state,
    cut_step: int,
    metric: str,
    greater: bool,
    before: float,
    value: float,
    tolerance: float,
    sizes: tuple[list[int], list[int]],
) -> dict:
    """The report event of a rollback (``sizes``: the state sizes before and after it)."""
    return {
        "kind": "rollback",
        "step": int(state.global_step),
        "epoch": state.epoch,
        "restored_step": int(cut_step),
        "metric": metric,
        "greater_is_better": greater,
        "metric_before": before,
        "metric_after": value,
        "tolerance": tolerance,
        "sizes_before": sizes[0],
        "sizes_after": sizes[1],
    }


def save_snapshot(snapshot: dict, checkpoint: str | os.PathLike) -> str:
    """Write ``snapshot`` into the checkpoint folder (atomically); the path written."""
    return save_torch_atomic(snapshot, os.path.join(os.fspath(checkpoint), SNAPSHOT_NAME))


def load_snapshot(checkpoint: str | os.PathLike) -> dict | None:
    """The snapshot saved in ``checkpoint`` (CPU tensors), or None when the folder has none."""
    path = os.path.join(os.fspath(checkpoint), SNAPSHOT_NAME)
    if not os.path.isfile(path):
        return None
    snapshot = torch.load(path, map_location="cpu", weights_only=True)
    snapshot["sizes"] = {int(k): int(v) for k, v in snapshot["sizes"].items()}
    return snapshot
