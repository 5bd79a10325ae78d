"""CompreSSM Mamba (model_type ``compressm_mamba``): Mamba LMs with per-layer state sizes.

The Auto-class registration (and ``register_for_auto_class``, so that ``save_pretrained`` writes
``auto_map`` and copies the model code) is done for every architecture in one place:
``compressm_hf.modeling.register_auto_classes``, run when the parent package is imported.
"""

from __future__ import annotations

from .configuration_compressm_mamba import CompreSSMMambaConfig
from .modeling_compressm_mamba import (
    CompreSSMMambaBlock,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaMixer,
    CompreSSMMambaModel,
    CompreSSMMambaPreTrainedModel,
    MissingStatisticsError,
    NonUniformStateSizesError,
    ParamSwap,
    UnsupportedAdapterError,
    export_to_mamba,
)

__all__ = [
    "CompreSSMMambaBlock",
    "CompreSSMMambaConfig",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaMixer",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
    "MissingStatisticsError",
    "NonUniformStateSizesError",
    "ParamSwap",
    "UnsupportedAdapterError",
    "export_to_mamba",
]
