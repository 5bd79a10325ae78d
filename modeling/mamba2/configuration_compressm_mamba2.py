"""Configuration of CompreSSM Mamba-2: transformers' ``Mamba2Config`` with one state size per layer.

This file is copied next to saved models (``trust_remote_code``): it imports only transformers,
huggingface_hub (a dependency of transformers) and the same-folder ``configuration_common``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Mamba2Config

from .configuration_common import PerLayerStateSizesMixin


@strict
class CompreSSMMamba2Config(PerLayerStateSizesMixin, Mamba2Config):
    r"""Configuration of a Mamba-2 (SSD) language model whose layers may have different state sizes.

    Every field of [`transformers.Mamba2Config`] keeps its meaning and default (`num_heads`, `head_dim`,
    `n_groups`, `expand`, `chunk_size`, `conv_kernel`, `time_step_limit`, ...; `hidden_size * expand` must
    equal `num_heads * head_dim`). Parameter names and shapes of the models are exactly those of
    `Mamba2ForCausalLM`, so a stock `mamba2` checkpoint loads unchanged (its `state_size` is then used for
    every layer). A layer's state size `N_i` appears only in the `in_proj` rows and `conv1d` channels of
    its `n_groups * N_i` B block and C block.

    Args:
        state_sizes (`list[int]`, *optional*):
            The SSM state size `N` (per group) of each layer, `len(state_sizes) == num_hidden_layers`, every
            entry `>= 1`. Defaults to `[state_size] * num_hidden_layers`. CompreSSM shrinks these entries
            during training (the model and this list are updated together).
        state_size (`int`, *optional*, defaults to 128):
            Kept for compatibility with code that reads `config.state_size`: after validation it is always
            `max(state_sizes)`. Use `state_sizes[i]` (or `model.backbone.layers[i].mixer.state_size`) for a
            layer's actual size.
        compression (`dict`, *optional*):
            Free-form record written by the CompreSSM trainer callback (tolerance, the steps at which
            reductions happened, original state sizes). `None` for a model that was never compressed.

    Raises:
        ValueError: `state_sizes` is not a list of one int `>= 1` per layer, `num_heads` is not a multiple of
            `n_groups`, or `chunk_size < 1`.

    Example:

    ```python
    >>> from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM
    >>> config = CompreSSMMamba2Config(
    ...     vocab_size=100, hidden_size=32, num_heads=4, head_dim=16, n_groups=2, num_hidden_layers=3,
    ...     state_sizes=[16, 8, 4],
    ... )
    >>> config.state_size
    16
    >>> model = CompreSSMMamba2ForCausalLM(config)
    ```
    """

    model_type = "compressm_mamba2"
    # checkpoints whose weights these models read: their own, and stock transformers `mamba2` (one state size)
    loadable_model_types = ("compressm_mamba2", "mamba2")

    state_sizes: list[int] | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.init_state_sizes()
        if self.num_heads % self.n_groups != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of n_groups={self.n_groups}: each group's B and C "
                f"are shared by num_heads / n_groups heads."
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 (tokens per SSD chunk), got {self.chunk_size}.")


__all__ = ["CompreSSMMamba2Config"]
