"""Calibration data for a saved model: byte-level (or tokenized) blocks of text, Mamba / Mamba-2 surrogate
statistics collected from them, and a plain perplexity loop."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

__all__ = ["calibration_blocks", "collect_statistics", "needs_statistics", "perplexity"]


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
