"""CompreSSM Mamba (model_type ``compressm_mamba``): Mamba LMs with per-layer state sizes.

Importing this package registers the classes with the transformers Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``) and marks them with
``register_for_auto_class``, so that ``save_pretrained`` writes ``auto_map`` into ``config.json`` and
copies the model code next to the weights (``from_pretrained(..., trust_remote_code=True)`` then works
without compressm_hf installed).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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

AutoConfig.register(CompreSSMMambaConfig.model_type, CompreSSMMambaConfig, exist_ok=True)
AutoModel.register(CompreSSMMambaConfig, CompreSSMMambaModel, exist_ok=True)
AutoModelForCausalLM.register(CompreSSMMambaConfig, CompreSSMMambaForCausalLM, exist_ok=True)

CompreSSMMambaConfig.register_for_auto_class()
CompreSSMMambaModel.register_for_auto_class("AutoModel")
CompreSSMMambaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

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
