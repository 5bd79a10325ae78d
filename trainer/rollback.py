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

import logging
import os
import warnings

import torch

from compressm_hf.engine import check_state_sizes
from compressm_hf.protocol import find_reducible_layers

from .fsdp2 import is_fully_sharded
from .report import save_torch_atomic
from .surgery import (
    broadcast_objects,
    rebuild_ddp_in_place_,
    restore_training_state,
    snapshot_training_state,
)
from .trainer_lookup import _resume_checkpoint_on_stack

logger = logging.getLogger(__name__)

__all__ = [
    "SNAPSHOT_NAME",
    "judge_cut",
    "load_snapshot",
    "resume_snapshot",
    "metric_value",
    "resolve_metric",
    "restore_cut",
    "rollback_event",
    "save_snapshot",
    "should_roll_back",
    "snapshot_training_state",
]

SNAPSHOT_NAME = "compressm_pragmatic_snapshot.pt"


def resolve_metric(
    args, trainer, metric: str | None, greater_is_better: bool | None, model=None
) -> tuple[str, bool]:
    """``(metric name with the eval_ prefix, greater is better)`` of a pragmatic run; check it can evaluate.

    The metric: ``metric`` (the callback's ``metric_for_pragmatic``), else ``args.metric_for_best_model``, else
    ``"eval_loss"``. The direction: ``greater_is_better`` if given; else ``args.greater_is_better`` when the
    metric is ``args.metric_for_best_model``; else False for names ending in ``loss``/``perplexity``/``error``.

    Raises:
        ValueError: no evaluation strategy, no Trainer found, no ``eval_dataset`` on it, or a ``model`` sharded
            with FSDP2 (the snapshot and the restore work on whole parameters).
    """
    if model is not None and is_fully_sharded(model):
        raise ValueError(
            "mode='pragmatic' snapshots and restores whole parameters, which is not supported for a model sharded "
            "with FSDP2 yet; use mode='tolerance' or 'fixed' under FSDP2, or pragmatic mode under DDP"
        )
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


def judge_cut(
    pending: dict,
    snapshot: dict | None,
    value: float,
    *,
    state,
    model,
    optimizer,
    wrapped,
    metric: str,
    greater: bool,
    tolerance: float,
) -> tuple[str, dict | None]:
    """Judge the pending cut by the metric ``value`` of an evaluation after it; ``(verdict, event)``.

    ``pending``: ``{"step", "metric_before", ...}`` of the cut. The verdicts: ``"kept"`` (the metric did not drop
    by more than ``tolerance``), ``"rolled_back"`` (it did: the ``snapshot`` was restored, ``event`` is the
    report's rollback event) and ``"kept_without_snapshot"`` (it did, but the snapshot is gone: a warning, the
    cut stays). Cutting stops after the last two. Every rank gets the same verdict (rank 0 decides).
    """
    before, cut_step = float(pending["metric_before"]), int(pending["step"])
    if not should_roll_back(before, value, greater, tolerance, int(state.global_step)):
        logger.info(
            "CompreSSM pragmatic: cut at step %d kept (%s %.4g -> %.4g)", cut_step, metric, before, value
        )
        return "kept", None
    if snapshot is None:
        warnings.warn(
            f"CompreSSM pragmatic: the cut at step {cut_step} should be rolled back ({metric} "
            f"{before:.4g} -> {value:.4g}) but its snapshot is not available; the cut is kept, cutting stops",
            stacklevel=4,
        )
        return "kept_without_snapshot", None
    sizes = restore_cut(model, optimizer, snapshot, wrapped)
    logger.warning(
        "CompreSSM pragmatic: %s went %.4g -> %.4g after the cut at step %d (tolerance %g): rolled back to "
        "sizes %s; no further cuts",
        metric,
        before,
        value,
        cut_step,
        tolerance,
        sizes[1],
    )
    return "rolled_back", rollback_event(state, cut_step, metric, greater, before, value, tolerance, sizes)


def save_snapshot(snapshot: dict, checkpoint: str | os.PathLike) -> str:
    """Write ``snapshot`` into the checkpoint folder (atomically); the path written."""
    return save_torch_atomic(snapshot, os.path.join(os.fspath(checkpoint), SNAPSHOT_NAME))


def load_snapshot(checkpoint: str | os.PathLike, pending_step: int | None = None) -> dict | None:
    """The snapshot saved in ``checkpoint`` (CPU tensors), or None when the folder has none (with a warning
    when ``pending_step`` names the cut that awaited it: the cut will then be kept without comparison)."""
    path = os.path.join(os.fspath(checkpoint), SNAPSHOT_NAME)
    if not os.path.isfile(path):
        if pending_step is not None:
            warnings.warn(
                f"resumed with a pragmatic cut (step {pending_step}) awaiting evaluation, but {path} is missing; "
                "the cut will be kept without comparison",
                stacklevel=4,
            )
        return None
    snapshot = torch.load(path, map_location="cpu", weights_only=True)
    snapshot["sizes"] = {int(k): int(v) for k, v in snapshot["sizes"].items()}
    return snapshot


def resume_snapshot(output_dir: str, global_step: int, pending_step: int) -> dict | None:
    """On resume, the snapshot of the cut at ``pending_step`` still awaiting its evaluation: from the checkpoint
    being resumed (found on the call stack), else ``output_dir/checkpoint-<global_step>``; None (with a warning:
    the cut is then kept without comparison) when it is missing."""
    folder = _resume_checkpoint_on_stack() or os.path.join(output_dir, f"checkpoint-{global_step}")
    return load_snapshot(folder, pending_step=pending_step)
