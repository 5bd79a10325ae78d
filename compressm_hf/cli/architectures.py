"""The architectures the CLIs build, load and analyze (:data:`ARCHITECTURE_TABLE`: Mamba, Mamba-2, LRU), and
loading a saved (or stock transformers ``mamba`` / ``mamba2``) causal LM folder as one of them."""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARCHITECTURES", "ARCHITECTURE_TABLE", "Architecture", "load_causal_lm", "model_kind"]


@dataclass(frozen=True)
class Architecture:
    """One architecture the CLIs build, load and analyze (a row of :data:`ARCHITECTURE_TABLE`).

    Attributes:
        name: the ``--architecture`` value and the ``kind`` the loaders return, e.g. ``"mamba2"``.
        label: how messages, titles and cards name it, e.g. ``"Mamba-2"``.
        article: ``"a"`` or ``"an"`` before ``label`` ("an LRU model").
        module: the modeling package, e.g. ``"compressm_hf.modeling.mamba2"``.
        config_class, causal_lm_class: class names in ``module``.
        model_types: the ``config.json`` ``model_type`` values that load into ``causal_lm_class``: ours, then
            the stock transformers type whose checkpoints load unchanged (if any).
        exact: the layers are exact LTI systems (Hankel singular values and error bounds are rigorous, no
            calibration data needed); ``False`` for selective layers (averaged LTI surrogate from statistics).
    """

    name: str
    label: str
    article: str
    module: str
    config_class: str
    causal_lm_class: str
    model_types: tuple[str, ...]
    exact: bool

    def classes(self) -> tuple[type, type]:
        """``(config class, causal LM class)``, imported on first use (transformers' import is slow)."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config_class), getattr(module, self.causal_lm_class)


ARCHITECTURE_TABLE: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "mamba", "Mamba", "a", "compressm_hf.modeling.mamba", "CompreSSMMambaConfig",
            "CompreSSMMambaForCausalLM", ("compressm_mamba", "mamba"), exact=False,
        ),
        Architecture(
            "mamba2", "Mamba-2", "a", "compressm_hf.modeling.mamba2", "CompreSSMMamba2Config",
            "CompreSSMMamba2ForCausalLM", ("compressm_mamba2", "mamba2"), exact=False,
        ),
        Architecture(
            "lru", "LRU", "an", "compressm_hf.modeling.lru", "LRUConfig", "LRUForCausalLM",
            ("compressm_lru",), exact=True,
        ),
    )
}  # fmt: skip
ARCHITECTURES = tuple(ARCHITECTURE_TABLE)
# config.json model_type -> our architecture name
_MODEL_TYPES = {t: a.name for a in ARCHITECTURE_TABLE.values() for t in a.model_types}
_STOCK_TYPES = [t for a in ARCHITECTURE_TABLE.values() for t in a.model_types[1:]]


def model_kind(model_dir: str | Path) -> str:
    """The architecture name (a key of :data:`ARCHITECTURE_TABLE`) of a saved model folder, from its
    ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``model_dir``.
        ValueError: a ``model_type`` that is neither ours nor one of transformers' stock types we load.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} is not a saved model folder (no config.json); pass the folder written by "
            "compressm-train, save_pretrained or Trainer.save_model"
        )
    model_type = json.loads(path.read_text("utf-8")).get("model_type")
    if model_type not in _MODEL_TYPES:
        stock = ", ".join(
            f"'{a.model_types[1]}' into {a.causal_lm_class}"
            for a in ARCHITECTURE_TABLE.values()
            if len(a.model_types) > 1
        )
        raise ValueError(
            f"{str(model_dir)!r} holds a {model_type!r} model; compressm-hf handles {sorted(_MODEL_TYPES)} "
            f"(transformers' stock checkpoints load unchanged: {stock})"
        )
    return _MODEL_TYPES[model_type]


def load_causal_lm(model_dir: str | Path, **kwargs):
    """Load a saved folder of ours, or a stock transformers ``mamba`` / ``mamba2`` one, as one of our models.

    Returns ``(model, kind)`` with ``kind`` in :data:`ARCHITECTURES`. Never contacts the Hub for a local folder.
    """
    kind = model_kind(model_dir)
    _, cls = ARCHITECTURE_TABLE[kind].classes()
    with warnings.catch_warnings():
        # loading a stock config into our config class warns about the model type
        for stock in _STOCK_TYPES:
            warnings.filterwarnings("ignore", message=f".*model of type {stock}.*")
        model = cls.from_pretrained(str(model_dir), **kwargs)
    return model, kind
