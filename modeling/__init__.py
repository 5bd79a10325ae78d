"""Model definitions (installed as ``compressm_hf.modeling``).

Importing this package (``import compressm_hf`` does it when transformers is installed) registers every
architecture and the byte-level tokenizer with the transformers Auto classes, in one place
(:func:`register_auto_classes`): ``AutoConfig`` / ``AutoModel*`` / ``AutoTokenizer`` ``.from_pretrained`` and
``pipeline("text-generation", model=folder)`` then work on saved folders without ``trust_remote_code``.
It also marks the classes with ``register_for_auto_class``, so that ``save_pretrained`` writes ``auto_map``
(into ``config.json`` / ``tokenizer_config.json``) and copies the code next to the weights, for loading with
``trust_remote_code=True`` where compressm_hf is not installed.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification, LRUModel
from .mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM, CompreSSMMambaModel
from .mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM, CompreSSMMamba2Model
from .tokenization_bytes import CompreSSMByteTokenizer

__all__ = ["CompreSSMByteTokenizer", "register_auto_classes"]

# config class -> {Auto class: model class}; every config here also gets the byte-level tokenizer
_AUTO_MODELS = {
    LRUConfig: {
        AutoModel: LRUModel,
        AutoModelForCausalLM: LRUForCausalLM,
        AutoModelForSequenceClassification: LRUForSequenceClassification,
    },
    CompreSSMMambaConfig: {
        AutoModel: CompreSSMMambaModel,
        AutoModelForCausalLM: CompreSSMMambaForCausalLM,
    },
    CompreSSMMamba2Config: {
        AutoModel: CompreSSMMamba2Model,
        AutoModelForCausalLM: CompreSSMMamba2ForCausalLM,
    },
}


def register_auto_classes() -> None:
    """Register the configs, models and tokenizer with the Auto classes (idempotent)."""
    CompreSSMByteTokenizer.register_for_auto_class("AutoTokenizer")
    for config_class, models in _AUTO_MODELS.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        AutoTokenizer.register(config_class, tokenizer_class=CompreSSMByteTokenizer, exist_ok=True)
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)


register_auto_classes()
