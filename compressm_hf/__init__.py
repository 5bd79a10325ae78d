"""compressm-hf: CompreSSM (arXiv 2510.02823) for Hugging Face.

The control-theory core (Gramians, Hankel singular values, rank selection, balanced and modal
truncation) imports only torch. The Trainer callback is loaded lazily on first access
(``compressm_hf.CompreSSMCallback``). When transformers is installed, ``import compressm_hf`` also imports
``compressm_hf.modeling``, which registers the models and the byte-level tokenizer with the Auto classes:
after ``import compressm_hf``, ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``pipeline``
load saved CompreSSM folders without ``trust_remote_code``. Without transformers only the core is there.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .diagonal import DiagonalSystem, rediagonalize
from .engine import CompressionEvent, compress_model
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
    "CompreSSMConfig": "settings",
    "CompressionSchedule": "trainer.schedule",
    "LRUConfig": "modeling.lru",
    "LRUModel": "modeling.lru",
    "LRUForCausalLM": "modeling.lru",
    "LRUForSequenceClassification": "modeling.lru",
    "CompreSSMMambaConfig": "modeling.mamba",
    "CompreSSMMambaModel": "modeling.mamba",
    "CompreSSMMambaForCausalLM": "modeling.mamba",
    "CompreSSMMamba2Config": "modeling.mamba2",
    "CompreSSMMamba2Model": "modeling.mamba2",
    "CompreSSMMamba2ForCausalLM": "modeling.mamba2",
    "CompreSSMByteTokenizer": "modeling.tokenization_bytes",
}

__all__ = [
    "BalancedTruncation",
    "CompreSSMError",
    "CompressionEvent",
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
    "compress_model",
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


def _register_with_transformers() -> None:
    """Import ``compressm_hf.modeling`` (it registers the Auto classes) when transformers is installed."""
    try:
        available = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        available = False
    if available:
        importlib.import_module(".modeling", __name__)


_register_with_transformers()


if TYPE_CHECKING:  # pragma: no cover
    from .modeling.lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification, LRUModel  # noqa: F401
    from .modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM, CompreSSMMambaModel  # noqa: F401
    from .modeling.tokenization_bytes import CompreSSMByteTokenizer  # noqa: F401
    from .settings import CompreSSMConfig  # noqa: F401
    from .trainer.callback import CompreSSMCallback  # noqa: F401
    from .trainer.schedule import CompressionSchedule  # noqa: F401
