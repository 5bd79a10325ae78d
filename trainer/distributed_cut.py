"""One cut inside a training run: rank 0 plans, every rank applies the same plans, the optimizer and the
distributed wrapper follow.

The engine (:func:`compressm_hf.engine.compress_model`) changes the layers; what a running training adds is
here: the surrogate statistics of selective layers are summed over the ranks (:mod:`.statistics`), the plan
is made once (rank 0) and broadcast, so every replica cuts identically; the optimizer's moments move to the new
parameters (:func:`~.surgery.transplant_optimizer_state`, ``"slice"`` or ``"reset"``); DDP is rebuilt in place around
the new parameters (:func:`~.surgery.rebuild_ddp_in_place_`). A model sharded with FSDP2 (``fully_shard``, e.g.
``accelerate launch`` with ``fsdp_version: 2``) is cut by :func:`~.fsdp2.compress_fully_sharded` instead: each
layer's parameters are gathered, rank 0 plans on the statistics of every rank, the new parameters and their
optimizer state are sharded again in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from compressm_hf.engine import CompressionEvent, LayerPlans, compress_model
from compressm_hf.protocol import find_reducible_layers

from .fsdp2 import compress_fully_sharded, is_fully_sharded
from .statistics import pool_statistics_, set_statistics
from .surgery import (
    decided_on_rank0,
    rebuild_ddp_in_place_,
    transplant_optimizer_state,
)

__all__ = ["TrainingCut", "cut_in_training"]


@dataclass
class TrainingCut:
    """What :func:`cut_in_training` did.

    Attributes:
        event: the engine's :class:`~compressm_hf.engine.CompressionEvent` (swaps, per-layer records, sizes).
        optimizer_counts: per-rule counts of the optimizer transplant (``{}`` without an optimizer or a cut).
        wall_time_s, cpu_time_s: the whole cut, planning and transplant included (CPU: process time, all
            threads).
    """

    event: CompressionEvent
    optimizer_counts: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0


@torch.no_grad()
def cut_in_training(
    model: torch.nn.Module,
    optimizer,
    plan: Callable[[Sequence[torch.nn.Module]], LayerPlans],
    *,
    step: int,
    optimizer_state: str = "slice",
    wrapped: torch.nn.Module | None = None,
) -> TrainingCut:
    """Cut ``model`` at optimizer step ``step``, identically on every rank.

    Args:
        model: the unwrapped model (the Trainer's ``model``).
        optimizer: its optimizer (or an accelerate wrapper of one), or None.
        plan: called on rank 0 only, with the reducible layers; returns the :class:`LayerPlans` broadcast to
            every rank (e.g. ``lambda layers: plan_layers(layers, policy, step=step)``).
        step: names the broadcast in a timeout error.
        optimizer_state: ``"slice"`` or ``"reset"`` (see :func:`~.surgery.transplant_optimizer_state`).
        wrapped: the DDP wrapper to rebuild after the cut (``trainer.model_wrapped``; ignored when it is
            ``model`` itself or None, as under FSDP2, which shards the model in place).

    Returns:
        :class:`TrainingCut`. Surrogate statistics are switched off and reset on every layer.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    if is_fully_sharded(
        model
    ):  # FSDP2: per-layer gather, pooled statistics, re-shard; the optimizer is carried
        sharded = compress_fully_sharded(model, optimizer, plan, optimizer_state=optimizer_state, step=step)
        set_statistics(model, False, reset=True)
        return TrainingCut(sharded, sharded.optimizer, time.perf_counter() - t0, time.process_time() - cpu0)
    layers = find_reducible_layers(model)
    pool_statistics_(layers)  # rank 0 plans from the tokens of every rank
    plans = decided_on_rank0(lambda: plan(layers), f"the compression plan of step {step}")
    set_statistics(model, False, reset=True)
    event = compress_model(model, plans=plans)
    counts = {}
    if event.swaps:
        if optimizer is not None:
            counts = transplant_optimizer_state(optimizer, event.swaps, optimizer_state)
        if wrapped is not None and wrapped is not model:
            rebuild_ddp_in_place_(wrapped)
    return TrainingCut(event, counts, time.perf_counter() - t0, time.process_time() - cpu0)
