"""Configuration of CompreSSM Mamba: transformers' ``MambaConfig`` with one state size per layer.

This file is copied next to saved models (``trust_remote_code``): it imports only transformers and
huggingface_hub (a dependency of transformers).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig


@strict
class CompreSSMMambaConfig(MambaConfig):
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
        if self.state_sizes is None:
            self.state_sizes = [int(self.state_size)] * int(self.num_hidden_layers)
        elif isinstance(self.state_sizes, (list, tuple)):
            self.state_sizes = list(self.state_sizes)
        else:
            raise ValueError(
                f"state_sizes must be a list with one int per layer (num_hidden_layers={self.num_hidden_layers}), "
                f"got the {type(self.state_sizes).__name__} {self.state_sizes!r}; e.g. state_sizes="
                f"{[16] * int(self.num_hidden_layers)}, or set state_size for the same size in every layer."
            )
        self.validate_state_sizes()
        self.state_size = max(self.state_sizes)

    def validate_state_sizes(self):
        """Raise ``ValueError`` (naming the bad value) unless ``state_sizes`` fits ``num_hidden_layers``."""
        sizes = self.state_sizes
        if len(sizes) != self.num_hidden_layers:
            raise ValueError(
                f"state_sizes has {len(sizes)} entries ({sizes}) but num_hidden_layers is "
                f"{self.num_hidden_layers}: give exactly one state size per layer."
            )
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(
                    f"state_sizes[{i}] is {n!r}; every state size must be an int >= 1 (got {sizes})."
                )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' ``get_config_dict``, refusing a checkpoint that is neither ``compressm_mamba`` nor
        stock ``mamba``: transformers only warns there, and the model would come back with every weight
        freshly initialized."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found is not None and found not in cls.loadable_model_types:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a `{found}` checkpoint, which {cls.__name__} "
                f"(model_type `{cls.model_type}`) cannot load: none of its weights would be used. Load it with the "
                f"classes of `{found}` (e.g. AutoModelForCausalLM.from_pretrained), or pass a "
                f"{' or '.join(f'`{t}`' for t in cls.loadable_model_types)} checkpoint."
            )
        return config_dict, kwargs


__all__ = ["CompreSSMMambaConfig"]
