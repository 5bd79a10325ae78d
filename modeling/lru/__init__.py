"""Linear Recurrent Unit (LRU) models in the transformers style, compressible by CompreSSM.

Registered with the Auto classes by ``compressm_hf.modeling.register_auto_classes`` (run when the parent
package is imported).
"""

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
