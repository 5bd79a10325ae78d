"""``compressm_train_args.json``: the arguments a model folder was trained with, and its training data.

``compressm-train`` writes the record into the output folder; ``compressm-analyze`` reads it to calibrate
on the data the model was trained on (Mamba statistics and perplexity) instead of guessing. The record
never holds an absolute path (the folder may be pushed to the Hub): a data file inside the folder is
written relative to it, one outside by its file name only, and then the analysis asks for ``--dataset``.

The ``"data"`` entry: ``dataset`` (as above), ``source`` (``"builtin"`` for ``shakespeare``, ``"local"``
for a file or folder, ``"datasets"`` for a ``datasets`` name), ``text_column``, ``dataset_split``,
``block_size`` and the other data arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RECORD_NAME", "TrainingDataError", "calibration_source", "data_source_kind", "read_record"]

RECORD_NAME = "compressm_train_args.json"
BUILTIN_DATASETS = ("shakespeare",)


class TrainingDataError(ValueError):
    """The calibration data cannot be found: no ``--dataset`` and no usable record in the folder."""


def data_source_kind(dataset: str) -> str:
    """``"builtin"``, ``"local"`` (an existing file or folder) or ``"datasets"`` (anything else)."""
    if dataset in BUILTIN_DATASETS:
        return "builtin"
    return "local" if os.path.exists(dataset) else "datasets"


def _guess_kind(model_dir: str | os.PathLike, name: str) -> str:
    """For a record written before ``source`` existed: a name with a text-file suffix is a local file."""
    if name in BUILTIN_DATASETS:
        return "builtin"
    if (Path(model_dir) / name).exists() or Path(name).suffix in (".txt", ".json", ".jsonl"):
        return "local"
    return "datasets"


def read_record(model_dir: str | os.PathLike) -> dict | None:
    """The parsed record of ``model_dir``, or ``None`` when the folder has none (or it is not a JSON object)."""
    path = Path(model_dir) / RECORD_NAME
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def calibration_source(
    model_dir: str | os.PathLike, dataset: str | None, text_column: str | None
) -> tuple[str, str, str, str]:
    """Which text to calibrate ``model_dir`` on: ``(dataset, text_column, split, how)``.

    An explicit ``dataset`` wins (``how`` = ``"--dataset"``). Otherwise the training data recorded in
    the folder is used (``how`` = ``"the training data recorded in compressm_train_args.json"``); a
    recorded local file is looked up relative to ``model_dir``.

    Raises:
        TrainingDataError: no ``dataset`` and no record, or a recorded local file that is not there
            (recorded by name only); the message says to pass ``--dataset``.
    """
    if dataset is not None:
        return dataset, text_column or "text", "train", "--dataset"
    record = read_record(model_dir)
    data = record.get("data") if record else None
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        raise TrainingDataError(
            f"{os.fspath(model_dir)!r} does not record what it was trained on (no {RECORD_NAME}: it was not "
            "written by compressm-train); pass --dataset with text like the training data ('shakespeare', "
            "a .txt/.json/.jsonl file, a folder of .txt files, or a datasets name)"
        )
    name = data["dataset"]
    column = text_column or data.get("text_column") or "text"
    split = data.get("dataset_split") or "train"
    how = f"the training data recorded in {RECORD_NAME}"
    kind = data.get("source") or _guess_kind(model_dir, name)
    if kind == "local":
        local = Path(model_dir) / name
        if not local.exists():
            raise TrainingDataError(
                f"{os.fspath(model_dir)!r} was trained on the local file or folder {name!r}, recorded by name "
                f"only (no absolute paths are saved); pass --dataset PATH/{name}"
            )
        return str(local), column, split, how
    return name, column, split, how
