"""CompreSSM Mamba-2 (model_type ``compressm_mamba2``): Mamba-2 (SSD) LMs with per-layer state sizes.

The Auto classes (and ``auto_map`` / the code copy for ``trust_remote_code``) are registered in one place,
:func:`compressm_hf.modeling.register_auto_classes`, which ``import compressm_hf`` runs.
"""

from __future__ import annotations

from .configuration_compressm_mamba2 import CompreSSMMamba2Config
from .modeling_compressm_mamba2 import (
    CompreSSMMamba2Block,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Mixer,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
    export_to_mamba2,
)

__all__ = [
    "CompreSSMMamba2Block",
    "CompreSSMMamba2Config",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
    "export_to_mamba2",
]
