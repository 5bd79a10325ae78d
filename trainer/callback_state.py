"""What of ``CompreSSMCallback`` survives a checkpoint: export into ``TrainerState``, and restore on resume.

transformers saves ``callback.state()`` into ``trainer_state.json`` (``stateful_callbacks``) at every checkpoint.
The entry is ``{"args": CompreSSMConfig.to_dict(), "attributes": {...}}``: ``args`` rebuild an equivalent callback
(``type(cb)(**args)``, what ``Trainer._load_callback_state`` does with ``restore_callback_states_from_checkpoint``)
and ``attributes`` carry the run's history (:data:`EXPORTED_ATTRIBUTES`). Without that flag the callback
restores itself from the same entry at ``on_train_begin`` of a resumed run (:func:`restore_or_reset`).
"""

from __future__ import annotations

import warnings

from .report import jsonable

__all__ = ["EXPORTED_ATTRIBUTES", "export_state", "restore_attributes", "restore_or_reset"]

# name -> how a saved value becomes the attribute again (the JSON form of each)
_RESTORE = {
    "history": lambda v: list(v or []),  # report events
    "done_steps": lambda v: [int(s) for s in v or []],  # scheduled steps already handled
    "stopped": lambda v: bool(v or False),  # pragmatic: cutting stopped after a rollback
    "original_sizes": lambda v: None if v is None else [int(n) for n in v],
    "pending": lambda v: (
        v
    ),  # pragmatic: {"step", "metric_before", "sizes_before"} of a cut awaiting evaluation
    "health": lambda v: list(v or []),  # non-finite / no-signal training noticed ({"step", "at", ...})
    "training_stopped": lambda v: v,  # on_nonfinite="stop": why the training was stopped
}
EXPORTED_ATTRIBUTES = tuple(_RESTORE)


def export_state(callback) -> dict:
    """``{"args", "attributes"}`` of ``callback`` (JSON-safe)."""
    attributes = {name: getattr(callback, name) for name in EXPORTED_ATTRIBUTES}
    return {"args": callback.config.to_dict(), "attributes": jsonable(attributes)}


def restore_attributes(callback, attributes: dict | None) -> None:
    """Set every exported attribute of ``callback`` from ``attributes`` (missing ones: empty)."""
    attributes = attributes or {}
    for name, restore in _RESTORE.items():
        setattr(callback, name, restore(attributes.get(name)))


def restore_or_reset(callback, state) -> None:
    """A resumed run (``state.global_step > 0``) takes its exported state back from ``state.stateful_callbacks``;
    a fresh one starts empty. A resume without a saved entry keeps what the callback holds, with a warning
    when that is nothing (the earlier attempts are then skipped)."""
    if state.global_step == 0:
        restore_attributes(callback, None)
        return
    data = (state.stateful_callbacks or {}).get(type(callback).__name__)
    if isinstance(data, list):
        data = data[0] if data else None
    if isinstance(data, dict) and "attributes" in data:
        restore_attributes(callback, data["attributes"])
    elif not callback.history:
        warnings.warn(
            "resuming without a saved CompreSSMCallback state: the compression history starts empty; "
            f"attempts at steps <= {state.global_step} are skipped",
            stacklevel=4,
        )
