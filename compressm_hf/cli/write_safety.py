"""A full disk during training, as an error that says so: :class:`WriteFailedError` and
:func:`disk_full_as_error` (used by ``compressm-train`` around the whole run)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["WriteFailedError", "disk_full_as_error"]


class WriteFailedError(OSError):
    """Writing into the output folder failed (the disk is full, or the write failed): nothing to fix in the
    arguments; free space, then resume. ``folder`` is the output folder, ``resume_from`` the last complete
    checkpoint in it (``None`` if there is none yet)."""

    def __init__(self, message: str, *, folder: str, resume_from: str | None):
        super().__init__(message)
        self.folder = folder
        self.resume_from = resume_from


# What a full disk looks like from torch.save (the zip writer of torch/csrc/.../inline_container.cc),
# safetensors (a Rust io::Error) and plain Python writes.
_WRITE_FAILURE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_WRITE_FAILURE_MARKERS = (
    "inline_container",
    "PytorchStreamWriter failed",
    "file write failed",
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
)


def _is_write_failure(err: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_FAILURE_ERRNOS:
            return True
        if any(marker in str(current) for marker in _WRITE_FAILURE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_space(folder: str) -> str:
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


@contextmanager
def disk_full_as_error(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write into ``folder`` (torch's ``inline_container.cc`` error, ``ENOSPC``, ...) into a
    :class:`WriteFailedError` that says the disk is full and which checkpoint ``--resume_from_checkpoint True``
    will go on from."""
    from compressm_hf.trainer.checkpoints import last_complete_checkpoint

    try:
        yield
    except Exception as err:
        if isinstance(err, WriteFailedError) or not _is_write_failure(err):
            raise
        folder = os.fspath(folder)
        last = last_complete_checkpoint(folder)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        resume = (
            f"the last complete checkpoint is {last}"
            if last is not None
            else "no checkpoint is complete yet, so that run starts over"
        )
        raise WriteFailedError(
            f"writing into {folder} failed: the disk is full (or the write failed: {detail}); "
            f"{_free_space(folder)} free there now. A checkpoint being written is left incomplete and is set "
            "aside on resume. Free some space (old checkpoint-N folders, a lower --save_total_limit), then run "
            f"the same command with --resume_from_checkpoint True ({resume}).",
            folder=folder,
            resume_from=last,
        ) from err
