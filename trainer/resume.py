"""Resume a run whose layers were cut: give a model built at its original size the checkpoint's state sizes.

Under DDP or a single process nothing is needed: loading the checkpoint's state dict shrinks each layer first
(the mixers' ``_load_from_state_dict`` calls ``resize_``). Under FSDP2 (``fully_shard``) that cannot work:
the model is sharded before the checkpoint is loaded (transformers' Trainer loads an FSDP checkpoint after
``accelerator.prepare``, with ``torch.distributed.checkpoint`` into the existing ``DTensor`` shapes), so the
layers must have the saved sizes *before* ``fully_shard``::

    model = CompreSSMMambaForCausalLM(config)          # original sizes
    resize_to_checkpoint(model, "out/checkpoint-400")  # the sizes the checkpoint was written at
    fully_shard(...)  # or Trainer(...) with FSDP2, then trainer.train(resume_from_checkpoint=...)

:func:`saved_state_sizes` reads the sizes from the checkpoint's ``compression_report.json`` (``final_sizes``,
written into every checkpoint by :class:`~compressm_hf.trainer.CompreSSMCallback`), else from its
``config.json`` (``state_sizes``). :func:`resize_to_checkpoint` calls each reducible layer's ``resize_``
(:meth:`compressm_hf.protocol.ReducibleSSM.resize_`); the values of the resized parameters are meant to be
overwritten by the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch

from compressm_hf.engine import check_state_sizes
from compressm_hf.protocol import require_reducible_layers

from .checkpoints import is_complete_checkpoint
from .fsdp2 import is_fully_sharded
from .report import REPORT_NAME, read_report
from .trainer_lookup import fsdp_version

logger = logging.getLogger(__name__)

__all__ = ["resize_for_fsdp2_resume", "resize_to_checkpoint", "saved_state_sizes"]

CONFIG_NAME = "config.json"


def _sizes(value, source: str) -> list[int]:
    """``value`` as a list of state sizes (ints >= 1), or a ValueError naming ``source``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{source}: expected a non-empty list of state sizes, got {value!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value):
        raise ValueError(f"{source}: every state size must be an integer >= 1, got {list(value)!r}")
    return [int(n) for n in value]


def saved_state_sizes(checkpoint_dir: str | os.PathLike, *, report_name: str = REPORT_NAME) -> list[int]:
    """The per-layer state sizes (``layer_idx`` order) a checkpoint was written at.

    Read from ``checkpoint_dir/compression_report.json`` (``"final_sizes"``: the model's sizes when the
    checkpoint was saved) when it is there and holds them, else from ``checkpoint_dir/config.json``
    (``"state_sizes"``).

    Args:
        checkpoint_dir: a checkpoint folder (``checkpoint-N``, or a ``save_pretrained`` folder).
        report_name: the report's file name (``CompreSSMCallback(report_name=...)``).

    Returns:
        ``list[int]``, one size per reducible layer.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a folder, or it holds neither file.
        ValueError: the report is not a compressm-hf report, or the sizes found are not a non-empty list
            of integers >= 1, or ``config.json`` has no ``state_sizes``.
    """
    folder = os.fspath(checkpoint_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist (or is not a folder)")
    report_path = os.path.join(folder, report_name)
    if os.path.isfile(report_path):
        final = read_report(report_path).get("final_sizes")
        if final is not None:
            return _sizes(final, f"{report_path} (final_sizes)")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"checkpoint folder {folder!r} has no {report_name} with final_sizes and no {CONFIG_NAME}: cannot tell "
            "the state sizes it was written at"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("state_sizes") is None:
        raise ValueError(
            f"{config_path} has no state_sizes (not a compressm-hf SSM config) and {folder!r} has no {report_name} "
            "with final_sizes: cannot tell the state sizes the checkpoint was written at"
        )
    return _sizes(config["state_sizes"], f"{config_path} (state_sizes)")


@torch.no_grad()
def resize_to_checkpoint(
    model: torch.nn.Module, checkpoint_dir: str | os.PathLike, *, report_name: str = REPORT_NAME
) -> list[int]:
    """Resize every reducible layer of ``model`` (not yet sharded) to the sizes ``checkpoint_dir`` was saved at.

    Call it on every rank, on the model built at its original size, before ``fully_shard`` (or before the
    Trainer / accelerate shards it), then load the checkpoint as usual. Layers already at the saved size are
    left as they are; the others are reallocated by their ``resize_`` (values unspecified until the
    checkpoint is loaded), which also writes ``config.state_sizes``.

    Args:
        model: the model (or a wrapper of it, e.g. peft's) with its reducible SSM layers.
        checkpoint_dir: the checkpoint folder (see :func:`saved_state_sizes`).
        report_name: the report's file name.

    Returns:
        ``list[int]``: the layers' sizes now (``layer_idx`` order), equal to the saved ones and to
        ``model.config.state_sizes``.

    Raises:
        ValueError: ``model`` is already ``fully_shard``-ed, has no reducible layer, has another number of
            reducible layers than the checkpoint, a saved size is larger than the layer's current one (a
            checkpoint only ever holds sizes at or below the original ones: wrong model or folder), or a
            layer has no ``resize_``.
        FileNotFoundError: see :func:`saved_state_sizes`.
        compressm_hf.engine.StateSizeMismatchError: a layer did not record its new size in the config.
    """
    if is_fully_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is already fully_shard-ed (FSDP2): its parameters cannot be resized any more; "
            "call resize_to_checkpoint on the model built at its original size, before fully_shard / the Trainer"
        )
    layers = require_reducible_layers(model, "resize_to_checkpoint")
    saved = saved_state_sizes(checkpoint_dir, report_name=report_name)
    folder = os.fspath(checkpoint_dir)
    if len(saved) != len(layers):
        raise ValueError(
            f"{folder!r} was saved with {len(saved)} reducible layers (sizes {saved}), the model has {len(layers)} "
            f"(sizes {[int(layer.state_size) for layer in layers]}): not a checkpoint of this model"
        )
    _check_not_larger(layers, saved, folder)
    for layer, n in zip(layers, saved):
        if int(layer.state_size) == n:
            continue
        if not callable(getattr(layer, "resize_", None)):
            raise ValueError(
                f"layer {layer.layer_idx} ({type(layer).__name__}) has no resize_(); cannot give it the "
                f"{n} states of {folder!r}"
            )
        layer.resize_(n)
    sizes = check_state_sizes(model, layers)
    if sizes != saved:  # a resize_ that did not reach the size asked for
        raise ValueError(f"after resizing, the layers have sizes {sizes}, {folder!r} was saved at {saved}")
    return sizes


def _check_not_larger(layers: Sequence[torch.nn.Module], saved: Sequence[int], folder: str) -> None:
    """ValueError when a saved size exceeds its layer's current size (checked before anything changes)."""
    larger = [
        (int(layer.layer_idx), int(layer.state_size), n)
        for layer, n in zip(layers, saved)
        if n > int(layer.state_size)
    ]
    if larger:
        listed = ", ".join(f"layer {i}: {now} now, {n} saved" for i, now, n in larger)
        raise ValueError(
            f"{folder!r} holds larger state sizes than the model ({listed}): cuts only shrink layers, so build the "
            "model at its original size (or this is a checkpoint of another model)"
        )


def resize_for_fsdp2_resume(trainer, args, model, *, report_name: str = REPORT_NAME) -> list[int] | None:
    """At ``Trainer.__init__`` (the callback's ``on_init_end``): when the run will shard ``model`` with FSDP2 and
    ``args.resume_from_checkpoint`` names a checkpoint folder (as ``compressm-train --resume_from_checkpoint`` and
    transformers' example scripts set it), :func:`resize_to_checkpoint` now, before ``trainer.train`` shards the
    model. Returns the sizes, or None when there is nothing to do (no FSDP2, no complete checkpoint named, or the
    model is sharded already, e.g. by ``from_pretrained``). ``trainer.train(resume_from_checkpoint=True)`` names no folder
    here: call :func:`resize_to_checkpoint` yourself then (see the module docstring)."""
    folder = getattr(args, "resume_from_checkpoint", None)
    if model is None or fsdp_version(trainer, args) != 2 or not isinstance(folder, (str, os.PathLike)):
        return None
    if not is_complete_checkpoint(folder) or is_fully_sharded(
        model
    ):  # set aside, or missing: nothing to load
        return None
    sizes = resize_to_checkpoint(model, folder, report_name=report_name)
    logger.info(
        "CompreSSM: state sizes %s of the checkpoint to resume, set before FSDP2 shards the model", sizes
    )
    return sizes
