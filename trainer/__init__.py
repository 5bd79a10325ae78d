"""Hugging Face ``Trainer`` integration of CompreSSM (installed as ``compressm_hf.trainer``).

* :class:`CompreSSMCallback` -- compresses the model's SSM layers while it trains;
* :class:`CompressionSchedule` -- which optimizer steps attempt a reduction;
* :mod:`.surgery` -- optimizer-state transplant, in-place DDP rebuild, rollback snapshots;
* :mod:`.report` -- ``compression_report.json`` and the log payloads;
* :mod:`.defaults` -- the default of every compression setting (the paper's), shared with both CLIs.
"""

from __future__ import annotations

from .callback import CompreSSMCallback, NonFiniteTrainingWarning, find_trainer
from .hub import protect_hub_token
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
    "transplant_optimizer_state",
    "write_report",
]
