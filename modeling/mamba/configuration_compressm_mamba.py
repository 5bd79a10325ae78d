"""Configuration of CompreSSM Mamba: transformers' ``MambaConfig`` with one state size per layer.

This file is copied next to saved models (``trust_remote_code``): it imports only transformers,
huggingface_hub (a dependency of transformers) and the same-folder ``configuration_common``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig

from .configuration_common import PerLayerStateSizesMixin


@strict
class CompreSSMMambaConfig(PerLayerStateSizesMixin, MambaConfig):
    r"""Configuration of a Mamba (S6) language model whose layers may have different state sizes.

    Every field of [`transformers.MambaConfig`] keeps its meaning and default; parameter names and
    shapes of the models are exactly those of `MambaForCausalLM`, so a stock `mamba` checkpoint loads
    unchanged (its `state_size` is then used for every layer).

    Args:
        state_sizes (`list[int]`, *optional*):
            The SSM state size `N` of each layer, `len(state_sizes) == num_hidden_layers`, every entry
            `>= 1`. Defaults to `[state_size] * num_hidden_layers`. CompreSSM shrinks these entries
            during training (the model and this list are updated together).
        state_size (`int`, *optional*, defaults to 16):
            Kept for compatibility with code that reads `config.state_size`: after validation it is
            always `max(state_sizes)` (the size a uniform model would need to hold every layer). Use
            `state_sizes[i]` (or `model.backbone.layers[i].mixer.state_size`) for a layer's actual size.
        compression (`dict`, *optional*):
            Free-form record written by the CompreSSM trainer callback (tolerance, the steps at which
            reductions happened, original state sizes). `None` for a model that was never compressed.

    Note: the CUDA kernels of `mamba_ssm` accept state sizes up to 256 per layer.

    Example:

    ```python
    >>> from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM
    >>> config = CompreSSMMambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=100, state_sizes=[16, 8, 4])
    >>> config.state_size
    16
    >>> model = CompreSSMMambaForCausalLM(config)
    ```
    """

    model_type = "compressm_mamba"
    # checkpoints whose weights these models read: their own, and stock transformers `mamba` (one state size)
    loadable_model_types = ("compressm_mamba", "mamba")

    state_sizes: list[int] | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.init_state_sizes()


__all__ = ["CompreSSMMambaConfig"]
