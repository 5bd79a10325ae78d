"""Command-line tools: ``compressm-train`` (:mod:`.train`) and ``compressm-analyze`` (:mod:`.analyze`).

This module holds the helpers both share: the table of architectures (:data:`ARCHITECTURE_TABLE`: Mamba,
Mamba-2, LRU), loading a saved (or stock ``mamba`` / ``mamba2``) causal LM folder, byte-level calibration
blocks, Mamba / Mamba-2 surrogate statistics and a plain perplexity loop.
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TABLE",
    "Architecture",
    "calibration_blocks",
    "collect_statistics",
    "format_table",
    "load_causal_lm",
    "model_kind",
    "needs_statistics",
    "perplexity",
]


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


def needs_statistics(model) -> bool:
    """Whether the model's reducible layers build their LTI surrogate from statistics (Mamba)."""
    from compressm_hf import find_reducible_layers

    return any(hasattr(layer, "collect_statistics") for layer in find_reducible_layers(model))


def calibration_blocks(
    source: str,
    *,
    block_size: int,
    num_train_blocks: int,
    num_eval_blocks: int,
    text_column: str = "text",
    split: str = "train",
    model_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(train_blocks, eval_blocks)`` int64 ``(n, block_size)`` tensors of token ids from ``source``.

    The text comes from :func:`compressm_hf.data.load_text` (``split`` for a ``datasets`` name). When ``model_dir`` holds a tokenizer
    (``tokenizer.json`` / ``tokenizer_config.json``), the text is tokenized with it; otherwise it is read
    as bytes (ids ``0..255``, the vocabulary of the models ``compressm-train`` builds). Byte ids are folded
    into a smaller ``vocab_size`` (with a warning). ``eval_blocks`` is ``None`` when ``num_eval_blocks == 0``.
    """
    from compressm_hf.data import load_text

    text = load_text(source, text_column=text_column, split=split)
    tokenizer = None
    if model_dir is not None and any(
        (Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    total = num_train_blocks + num_eval_blocks
    if tokenizer is not None:
        # tokens are rarely shorter than 1 character: 8 characters per token is plenty
        cut = len(text) - min(len(text) // 20, 8 * block_size * max(num_eval_blocks, 1))
        train_ids = tokenizer(text[: min(cut, 8 * block_size * max(num_train_blocks, 1))])["input_ids"]
        eval_ids = tokenizer(text[cut:])["input_ids"] if num_eval_blocks else []
        train = torch.tensor(train_ids, dtype=torch.long)
        evals = torch.tensor(eval_ids, dtype=torch.long)
    else:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        cut = int(len(data) * 0.95)
        train, evals = data[:cut], data[cut:]
        if vocab_size is not None and vocab_size < 256:
            warnings.warn(
                f"the model's vocabulary ({vocab_size}) is smaller than the 256 byte values and the folder has no "
                f"tokenizer: byte ids are folded modulo {vocab_size} (fine for statistics, meaningless as text)",
                stacklevel=2,
            )
            train, evals = train % vocab_size, evals % vocab_size

    def blocks(ids: torch.Tensor, n: int) -> torch.Tensor:
        n = min(n, len(ids) // block_size)
        if n < 1:
            raise ValueError(
                f"{source!r} is too short for one block of {block_size} tokens (needed {total} blocks)"
            )
        return ids[: n * block_size].reshape(n, block_size)

    return blocks(train, num_train_blocks), (blocks(evals, num_eval_blocks) if num_eval_blocks else None)


@torch.no_grad()
def collect_statistics(model, blocks: torch.Tensor, batch_size: int) -> int:
    """Run ``blocks`` through a Mamba model with statistics collection on; returns the tokens seen.

    The statistics are reset first. The model is put in training mode (collection only happens there;
    Mamba has no dropout) and back in eval mode afterwards.
    """
    from compressm_hf import find_reducible_layers

    layers = find_reducible_layers(model)
    device = next(model.parameters()).device
    for layer in layers:
        if callable(getattr(layer, "reset_statistics", None)):
            layer.reset_statistics()
        layer.collect_statistics = True
    model.train()
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start : start + batch_size].to(device))
    finally:
        for layer in layers:
            layer.collect_statistics = False
        model.eval()
    return int(blocks.numel())


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    """``exp`` of the mean next-token cross-entropy over ``blocks`` (every position but the first)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [headers, *rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
