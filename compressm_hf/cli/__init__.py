"""Command-line tools: ``compressm-train`` (:mod:`.train`) and ``compressm-analyze`` (:mod:`.analyze`).

A face over the helpers both share, each in its own module: the table of architectures and model loading
(:mod:`.architectures`), calibration blocks, surrogate statistics and perplexity (:mod:`.calibration`),
plain text tables (:mod:`.formatting`).
"""

from __future__ import annotations

from .architectures import ARCHITECTURE_TABLE, ARCHITECTURES, Architecture, load_causal_lm, model_kind
from .calibration import calibration_blocks, collect_statistics, needs_statistics, perplexity
from .formatting import format_table

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TABLE",
    "Architecture",
    "calibration_blocks",
    "collect_statistics",
    "format_table",
    "load_causal_lm",
    "model_kind",
    "needs_statistics",
    "perplexity",
]
