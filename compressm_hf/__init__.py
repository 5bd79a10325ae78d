"""compressm-hf: CompreSSM (arXiv 2510.02823) for Hugging Face.

The control-theory core (Gramians, Hankel singular values, rank selection, balanced and modal
truncation) imports only torch. The models and the Trainer callback import transformers and are
loaded lazily on first access, e.g. ``compressm_hf.CompreSSMCallback``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .diagonal import DiagonalSystem, rediagonalize
from .errors import (
    CompreSSMError,
    InvalidRankError,
    InvalidSystemError,
    InvalidToleranceError,
    UnstableSystemError,
)
from .gramians import gramians
from .hankel import hankel_singular_values
from .planning import plan_reduction
from .protocol import LTISystem, ParamSwap, ReducibleSSM, ReductionPlan, find_reducible_layers
from .rank import RankPolicy, apply_gate, round_rank, select_rank, select_states
from .truncation import BalancedTruncation, balanced_truncation, modal_importance, modal_truncation

__version__ = "0.1.0"

# name -> module (relative to this package) for the lazily imported, transformers-dependent API.
_LAZY = {
    "CompreSSMCallback": "trainer.callback",
    "CompressionSchedule": "trainer.schedule",
    "LRUConfig": "modeling.lru",
    "LRUModel": "modeling.lru",
    "LRUForCausalLM": "modeling.lru",
    "LRUForSequenceClassification": "modeling.lru",
    "CompreSSMMambaConfig": "modeling.mamba",
    "CompreSSMMambaModel": "modeling.mamba",
    "CompreSSMMambaForCausalLM": "modeling.mamba",
}

__all__ = [
    "BalancedTruncation",
    "CompreSSMError",
    "DiagonalSystem",
    "InvalidRankError",
    "InvalidSystemError",
    "InvalidToleranceError",
    "LTISystem",
    "ParamSwap",
    "RankPolicy",
    "ReducibleSSM",
    "ReductionPlan",
    "UnstableSystemError",
    "apply_gate",
    "balanced_truncation",
    "find_reducible_layers",
    "gramians",
    "hankel_singular_values",
    "modal_importance",
    "modal_truncation",
    "plan_reduction",
    "rediagonalize",
    "round_rank",
    "select_rank",
    "select_states",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .modeling.lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification, LRUModel  # noqa: F401
    from .modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM, CompreSSMMambaModel  # noqa: F401
    from .trainer.callback import CompreSSMCallback  # noqa: F401
    from .trainer.schedule import CompressionSchedule  # noqa: F401
