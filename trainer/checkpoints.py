"""Checkpoint integrity: which ``checkpoint-N`` folders a resume can trust.

transformers 5.x writes ``checkpoint-N`` in place (no temporary folder + rename): weights, then
optimizer/scheduler/scaler/RNG, then ``trainer_state.json`` (last, by the saving process), then
rotation of old checkpoints, then ``on_save``. ``Trainer.train(resume_from_checkpoint=True)``
takes the highest-numbered ``checkpoint-N`` folder whatever its content (``get_last_checkpoint``),
so a process killed while saving leaves a folder that the next resume picks and fails on (or, if
only the optimizer is missing, silently resumes with a fresh optimizer). A checkpoint is complete
when its ``trainer_state.json`` parses and the weights are there.

:class:`~compressm_hf.trainer.CompreSSMCallback` calls :func:`quarantine_incomplete_checkpoints` at
``on_init_end`` (``skip_incomplete_checkpoints=True``); ``compressm-train`` uses the same functions.
"""

from __future__ import annotations

import json
import os
import re

__all__ = [
    "INCOMPLETE_SUFFIX",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "quarantine_incomplete_checkpoints",
]

_CHECKPOINT_RE = r"^checkpoint-(\d+)$"
_TRAINER_STATE = "trainer_state.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
INCOMPLETE_SUFFIX = ".incomplete"


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True if ``folder`` is a checkpoint ``Trainer`` finished writing (parseable ``trainer_state.json``
    with a ``global_step``, and a weights file). FSDP/DeepSpeed sharded layouts count as complete when
    ``trainer_state.json`` is valid (they are written before it)."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, _TRAINER_STATE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "global_step" not in data:
        return False
    names = set(os.listdir(folder))
    sharded = any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)
    return sharded or any(n in names for n in _WEIGHT_FILES)


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.match(_CHECKPOINT_RE, name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (see :func:`is_complete_checkpoint`)."""
    for _, path in reversed(_checkpoint_folders(os.fspath(output_dir))):
        if is_complete_checkpoint(path):
            return path
    return None


def quarantine_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Rename every incomplete ``checkpoint-N`` in ``output_dir`` to ``checkpoint-N.incomplete[-k]``.

    Nothing is deleted; the renamed folders no longer match transformers' ``checkpoint-N`` pattern,
    so ``resume_from_checkpoint=True`` and checkpoint rotation skip them. Returns ``(old, new)`` pairs.
    """
    moved = []
    for _, path in _checkpoint_folders(os.fspath(output_dir)):
        if is_complete_checkpoint(path):
            continue
        target, k = path + INCOMPLETE_SUFFIX, 1
        while os.path.exists(target):
            target, k = f"{path}{INCOMPLETE_SUFFIX}-{k}", k + 1
        os.rename(path, target)
        moved.append((path, target))
    return moved
