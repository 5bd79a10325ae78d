"""The data ``compressm-train`` trains on: the text of ``--dataset`` cut into byte-level blocks, and how many
tokens one optimizer step sees."""

from __future__ import annotations

import os

__all__ = ["hub_dataset_names", "load_splits", "tokens_per_step"]


def load_splits(data_args) -> dict:
    """A ``DatasetDict`` (``train``, ``validation``) of byte blocks (int64 ``input_ids`` / ``labels`` of
    ``block_size``) from :class:`~compressm_hf.cli.train_args.DataArguments`.

    Raises:
        compressm_hf.data.DataUnavailableError: the text cannot be read (offline, missing file, ...).
    """
    from compressm_hf.data import byte_lm_splits, load_text

    text = load_text(data_args.dataset, text_column=data_args.text_column, split=data_args.dataset_split)
    return byte_lm_splits(
        text,
        block_size=data_args.block_size,
        validation_fraction=data_args.validation_fraction,
        max_train_blocks=data_args.max_train_blocks,
        max_validation_blocks=data_args.max_eval_blocks,
    )


def tokens_per_step(data_args, training_args) -> int:
    """Tokens (bytes) of one optimizer step over all processes."""
    return (
        training_args.per_device_train_batch_size
        * data_args.block_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size)
    )


def hub_dataset_names(dataset: str) -> list[str] | None:
    """The ``datasets`` name for the model card's metadata; ``None`` for the built-in text or a local file."""
    return None if dataset == "shakespeare" or os.path.exists(dataset) else [dataset]
