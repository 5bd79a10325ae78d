"""Model definitions (installed as ``compressm_hf.modeling``).

Importing this package registers every architecture with the transformers Auto classes, so that
``AutoConfig`` / ``AutoModel*`` ``.from_pretrained`` work on saved folders without ``trust_remote_code``
in a process where compressm_hf is installed. Saved folders also carry ``auto_map`` and the modeling code,
for loading with ``trust_remote_code=True`` where it is not.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification, LRUModel

AutoConfig.register(LRUConfig.model_type, LRUConfig, exist_ok=True)
AutoModel.register(LRUConfig, LRUModel, exist_ok=True)
AutoModelForCausalLM.register(LRUConfig, LRUForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LRUConfig, LRUForSequenceClassification, exist_ok=True)

from . import mamba  # noqa: E402,F401  (registers compressm_mamba with the Auto classes)
