"""Baseline 1: train from scratch at the sizes CompreSSM ended with."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def final_state_sizes(source: Any) -> list[int]:
    """The per-layer state sizes a compressed run reached.

    ``source`` is a compressed model (``source.config.state_sizes``), a config with ``state_sizes``, a
    ``compression_report.json`` path / its folder / its parsed dict (the last event's ``sizes_after``, else
    ``final_state_sizes`` / ``state_sizes``), or a plain list of ints.
    """
    if isinstance(source, torch.nn.Module):
        source = source.config
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "compression_report.json"
        source = json.loads(path.read_text())
    if isinstance(source, dict):
        events = [e for e in source.get("events", []) if e.get("sizes_after") is not None]
        for key in ("final_state_sizes", "state_sizes"):
            if source.get(key) is not None:
                return [int(s) for s in source[key]]
        if events:
            return [int(s) for s in events[-1]["sizes_after"]]
        raise ValueError(
            "the report holds no sizes (no 'final_state_sizes'/'state_sizes' and no event with 'sizes_after')"
        )
    sizes = getattr(source, "state_sizes", None)
    if sizes is not None:
        return [int(s) for s in sizes]
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [int(s) for s in source]
    raise TypeError(f"cannot read state sizes from {type(source).__name__}")


def scratch_config(base_config, sizes_from: Any):
    """A copy of ``base_config`` (the *uncompressed* model's config) at exactly the final per-layer sizes.

    ``sizes_from``: anything :func:`final_state_sizes` accepts. ``state_size`` is set to the largest final
    size, ``state_sizes`` to the list, and any ``compression`` record is dropped (it is a fresh model).
    """
    sizes = final_state_sizes(sizes_from)
    n_layers = getattr(base_config, "num_hidden_layers", len(sizes))
    if len(sizes) != n_layers:
        raise ValueError(f"{len(sizes)} sizes {sizes} for a config with num_hidden_layers={n_layers}")
    config = copy.deepcopy(base_config)
    config.state_sizes = list(sizes)
    if hasattr(config, "state_size"):
        config.state_size = max(sizes)
    if hasattr(config, "compression"):
        try:
            delattr(config, "compression")
        except AttributeError:
            config.compression = None
    return config


def scratch_model(model_class, base_config, sizes_from: Any):
    """``model_class(scratch_config(base_config, sizes_from))``; checks that the built layers match."""
    from compressm_hf.protocol import find_reducible_layers

    config = scratch_config(base_config, sizes_from)
    want = list(config.state_sizes)
    model = model_class(config)
    got = [int(layer.state_size) for layer in find_reducible_layers(model)]
    if got != want:
        raise RuntimeError(f"{model_class.__name__} built state sizes {got}, asked for {want}")
    return model
