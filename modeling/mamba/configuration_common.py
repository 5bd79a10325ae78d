"""Per-layer state sizes for the CompreSSM Mamba and Mamba-2 configurations (one source, used by both).

``modeling/mamba2/configuration_common.py`` is a symbolic link to this file: a configuration file copied
next to a saved model for ``trust_remote_code`` may only import same-folder modules, so each model folder
needs the file beside it, and ``save_pretrained`` copies its content. Imports nothing but the standard
library.
"""

from __future__ import annotations

__all__ = ["PerLayerStateSizesMixin"]


class PerLayerStateSizesMixin:
    """Mixin for a transformers config with one ``state_size``: adds the per-layer list ``state_sizes``.

    The subclass declares the dataclass fields ``state_sizes: list[int] | None = None`` and
    ``compression: dict | None = None``, sets ``loadable_model_types`` (its own ``model_type`` first, then
    the stock type whose checkpoints it reads), and calls :meth:`init_state_sizes` at the end of its
    ``__post_init__``. Afterwards ``state_sizes`` is a validated list of ints (one per layer, each ``>= 1``)
    and ``state_size == max(state_sizes)``.
    """

    loadable_model_types: tuple[str, ...] = ()

    def init_state_sizes(self) -> None:
        """Fill ``state_sizes`` from ``state_size`` when absent, validate it, and set ``state_size`` to its max.

        Raises:
            ValueError: ``state_sizes`` is not a list/tuple, or fails :meth:`validate_state_sizes`.
        """
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

    def validate_state_sizes(self) -> None:
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
        """transformers' ``get_config_dict``, refusing a checkpoint whose ``model_type`` is not one of
        ``loadable_model_types``: transformers only warns there, and the model would come back with every
        weight freshly initialized."""
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
