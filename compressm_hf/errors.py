"""Exceptions raised by compressm-hf. Every one subclasses ``ValueError`` and names the bad value."""

from __future__ import annotations


class CompreSSMError(ValueError):
    """Base class of all compressm-hf input errors."""


class InvalidSystemError(CompreSSMError):
    """A system's matrices have the wrong shapes, dtypes, or contain NaN/Inf."""


class UnstableSystemError(InvalidSystemError):
    """``A`` has an eigenvalue with ``|lambda| >= 1``: the Gramians do not exist."""


class InvalidToleranceError(CompreSSMError):
    """``tau`` is outside ``[0, 1)``."""


class InvalidRankError(CompreSSMError):
    """A requested rank is outside ``[1, n]``."""
