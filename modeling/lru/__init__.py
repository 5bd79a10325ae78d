"""Linear Recurrent Unit (LRU) models in the transformers style, compressible by CompreSSM."""

from .configuration_lru import LRUConfig
from .modeling_lru import (
    LRUCache,
    LRUForCausalLM,
    LRUForSequenceClassification,
    LRUMixer,
    LRUModel,
    LRUPreTrainedModel,
)

__all__ = [
    "LRUCache",
    "LRUConfig",
    "LRUForCausalLM",
    "LRUForSequenceClassification",
    "LRUMixer",
    "LRUModel",
    "LRUPreTrainedModel",
]
