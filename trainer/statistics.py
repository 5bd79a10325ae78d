"""The surrogate statistics of selective layers (Mamba, Mamba-2) in a run: switch their collection, pool them.

A selective layer builds its averaged LTI surrogate from running sums over the training tokens it saw while
``collect_statistics`` was on (``_stats``: float64 sums plus ``tokens`` / ``batches`` counts). In a distributed run
each rank saw only its own batches: :func:`pooled_statistics` sums them over the ranks, so rank 0 plans a cut from
every rank's tokens (DDP and FSDP2 alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from compressm_hf.protocol import find_reducible_layers

from .surgery import gathered_objects

__all__ = ["pool_statistics_", "pooled_statistics", "set_statistics"]


def set_statistics(model: torch.nn.Module, enabled: bool, reset: bool = False) -> None:
    """Switch surrogate-statistics collection of selective layers (those that have it) on or off."""
    for layer in find_reducible_layers(model):
        if hasattr(layer, "collect_statistics"):
            layer.collect_statistics = bool(enabled)
            if reset and callable(getattr(layer, "reset_statistics", None)):
                layer.reset_statistics()


def _statistics(layer: torch.nn.Module) -> dict | None:
    stats = getattr(layer, "_stats", None)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(
            f"{type(layer).__name__} (layer {layer.layer_idx}): _stats must be a dict of tensors and numbers or "
            f"None, got {type(stats).__name__}"
        )
    return stats


def pooled_statistics(layers: Sequence[torch.nn.Module]) -> dict[int, dict | None]:
    """Every selective layer's surrogate statistics summed over the ranks (``layer_idx -> dict``).

    The layers keep their own (local) statistics; these sums are what rank 0 plans with. The statistics are
    sums over tokens (``tokens`` and ``batches`` included), so summing them pools every rank's tokens.
    Tensors are summed in their own dtype (float64 for the accumulators); numbers as float64 and given back
    with their type. A layer without statistics on every rank maps to ``None``.

    Raises:
        RuntimeError: the ranks hold statistics of other keys or shapes for a layer (or only some of them do).
    """
    local = {int(layer.layer_idx): _statistics(layer) for layer in layers}
    signature = {
        idx: None
        if s is None
        else sorted((k, tuple(v.shape) if torch.is_tensor(v) else "number") for k, v in s.items())
        for idx, s in local.items()
    }
    if not dist.is_initialized():
        return {idx: None if s is None else dict(s) for idx, s in local.items()}
    every = gathered_objects(signature, "the surrogate-statistics check")
    if any(other != signature for other in every):
        raise RuntimeError(
            f"the ranks hold different surrogate statistics (layer -> keys and shapes per rank: {every}); every "
            "rank must collect statistics over the same steps before a cut"
        )
    pooled: dict[int, dict | None] = {}
    for idx, s in local.items():
        if s is None:
            pooled[idx] = None
            continue
        out = {}
        for key in sorted(s):
            value = s[key]
            summed = (
                value.detach().clone()
                if torch.is_tensor(value)
                else torch.tensor(float(value), dtype=torch.float64)
            )
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            out[key] = summed if torch.is_tensor(value) else type(value)(summed.item())
        pooled[idx] = out
    return pooled


def pool_statistics_(layers: Sequence[torch.nn.Module]) -> None:
    """Replace every selective layer's statistics by their sum over the ranks (:func:`pooled_statistics`), on
    every rank; a no-op without a process group or without selective layers. Call it on every rank, right before
    a cut (the statistics are reset after it). Ranks that disagree (statistics on some only) raise the
    ``RuntimeError`` of :func:`pooled_statistics` on every rank: whether a layer collects statistics is the same
    on every rank, whether it holds some need not be."""
    if not dist.is_initialized() or not any(hasattr(layer, "collect_statistics") for layer in layers):
        return
    pooled = pooled_statistics(layers)
    for layer in layers:
        if pooled.get(int(layer.layer_idx)) is not None:
            layer._stats = pooled[int(layer.layer_idx)]
