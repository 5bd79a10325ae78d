"""Hugging Face ``Trainer`` integration of CompreSSM (installed as ``compressm_hf.trainer``).

* :class:`CompreSSMCallback` -- compresses the model's SSM layers while it trains;
* :class:`CompressionSchedule` -- which optimizer steps attempt a reduction;
* :mod:`.surgery` -- optimizer-state transplant, in-place DDP rebuild, rollback snapshots;
* :mod:`.report` -- ``compression_report.json`` and the log payloads;
* :mod:`.trainer_lookup` (finding the Trainer), :mod:`.checkpoints` (checkpoint integrity), :mod:`.health`
  (non-finite / signal-free runs), :mod:`.rollback` (pragmatic mode) -- the callback's helpers, one job each
  (the cut itself is :func:`compressm_hf.engine.compress_model`);
* :mod:`.defaults` -- the default of every compression setting (the paper's), shared with both CLIs
  (held together by :class:`compressm_hf.settings.CompreSSMConfig`).

The callback and the Hub helpers (which import transformers) load on first access, so
``compressm_hf.settings`` can import ``.defaults`` / ``.schedule`` without a cycle through the callback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .report import REPORT_NAME, ReportWriteError, read_report, write_report
from .schedule import CompressionSchedule, ShortRunWarning
from .surgery import base_optimizer, rebuild_ddp_in_place_, transplant_optimizer_state

__all__ = [
    "REPORT_NAME",
    "CompreSSMCallback",
    "CompressionSchedule",
    "NonFiniteTrainingWarning",
    "ReportWriteError",
    "ShortRunWarning",
    "base_optimizer",
    "find_trainer",
    "protect_hub_token",
    "read_report",
    "rebuild_ddp_in_place_",
    "resize_to_checkpoint",
    "save_pretrained_fully_sharded",
    "saved_state_sizes",
    "transplant_optimizer_state",
    "write_report",
]

# name -> submodule, loaded on first access (they import transformers, and the callback imports
# compressm_hf.settings, which imports this package's light modules)
_LAZY = {
    "CompreSSMCallback": "callback",
    "NonFiniteTrainingWarning": "callback",
    "find_trainer": "callback",
    "protect_hub_token": "hub",
    "resize_to_checkpoint": "resume",
    "saved_state_sizes": "resume",
    "save_pretrained_fully_sharded": "fsdp2",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .callback import CompreSSMCallback, NonFiniteTrainingWarning, find_trainer
    from .fsdp2 import save_pretrained_fully_sharded
    from .hub import protect_hub_token
    from .resume import resize_to_checkpoint, saved_state_sizes
