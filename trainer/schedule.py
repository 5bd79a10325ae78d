"""Which optimizer steps attempt a reduction.

The paper (and the legacy code) attempts a reduction at 4 equally spaced points inside the
learning-rate warm-up, the first 10% of training: for 100k steps at 2.5k, 5k, 7.5k and 10k.
:class:`CompressionSchedule` describes such a schedule without knowing the run length, and
:meth:`CompressionSchedule.resolve` turns it into concrete optimizer steps once the Trainer knows
``state.max_steps`` (at ``on_train_begin``).

Three ways to describe a schedule:

* ``CompressionSchedule()`` -- the default: ``attempts=4`` equally spaced inside the fraction
  window ``(0.0, 0.1]`` of ``max_steps``;
* ``CompressionSchedule(window=(0.05, 0.3), attempts=3)`` -- another window or count
  (attempt ``i`` of ``k`` sits at ``start + (end - start) * i / k``, so the last one is at ``end``);
* ``CompressionSchedule(steps=[100, 200, 400])`` -- explicit optimizer steps (1-based, the value
  of ``state.global_step`` after the step, as seen by ``on_step_end``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["CompressionSchedule"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompressionSchedule:
    """When to attempt a reduction, relative to the run length or as explicit steps.

    Args:
        window: ``(start, end)`` fractions of ``max_steps`` with ``0 <= start < end <= 1``.
            Ignored when ``steps`` is given.
        attempts: number of equally spaced attempts inside the window (``>= 1``).
        steps: explicit optimizer steps (positive integers); overrides ``window``/``attempts``.

    Raises:
        ValueError: at construction, for a malformed window, attempt count or step list;
            at :meth:`resolve`, when ``max_steps`` is unknown (``<= 0``) for a fractional window,
            or when an explicit step is beyond ``max_steps``.
    """

    window: tuple[float, float] = (0.0, 0.1)
    attempts: int = 4
    steps: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.steps is not None:
            if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Iterable):
                raise ValueError(
                    f"schedule steps must be a sequence of positive integers, got {self.steps!r}"
                )
            steps = tuple(self.steps)
            if not steps:
                raise ValueError(
                    "schedule steps is empty: give at least one optimizer step (e.g. steps=[100])"
                )
            bad = [s for s in steps if not _is_int(s) or s < 1]
            if bad:
                raise ValueError(
                    f"schedule steps must be positive integers (optimizer steps, 1-based), got {bad!r} in {steps!r}"
                )
            object.__setattr__(self, "steps", tuple(sorted(set(steps))))
            return
        try:
            start, end = (float(x) for x in self.window)
        except (TypeError, ValueError):
            raise ValueError(
                f"schedule window must be a pair (start, end) of fractions of max_steps, got {self.window!r}"
            ) from None
        if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start < end <= 1.0):
            raise ValueError(
                f"schedule window must satisfy 0 <= start < end <= 1 (fractions of max_steps), got {self.window!r}"
            )
        object.__setattr__(self, "window", (start, end))
        if not _is_int(self.attempts) or self.attempts < 1:
            raise ValueError(f"schedule attempts must be an integer >= 1, got {self.attempts!r}")

    @classmethod
    def coerce(
        cls,
        schedule: CompressionSchedule | Sequence[int] | None = None,
        *,
        window: Sequence[float] | None = None,
        attempts: int | None = None,
        steps: Sequence[int] | None = None,
    ) -> CompressionSchedule:
        """Build a schedule from the callback's arguments (an explicit schedule wins)."""
        if isinstance(schedule, CompressionSchedule):
            return schedule
        if schedule is not None:
            if steps is not None:
                raise ValueError("give either schedule=[...] or steps=[...], not both")
            steps = schedule
        kwargs = {}
        if window is not None:
            kwargs["window"] = tuple(window) if isinstance(window, (list, tuple)) else window
        if attempts is not None:
            kwargs["attempts"] = attempts
        if steps is not None:
            kwargs["steps"] = tuple(steps) if isinstance(steps, (list, tuple, range)) else steps
        return cls(**kwargs)

    @property
    def is_fractional(self) -> bool:
        return self.steps is None

    def resolve(self, max_steps: int | None) -> list[int]:
        """The sorted, de-duplicated optimizer steps at which a reduction is attempted.

        Fractional points are ``round(max_steps * fraction)``, clamped to ``[1, max_steps]``;
        points that collide after rounding (very short runs) are merged.
        """
        if self.steps is not None:
            if max_steps is not None and max_steps > 0:
                late = [s for s in self.steps if s > max_steps]
                if late:
                    raise ValueError(
                        f"schedule steps {late} are beyond max_steps={max_steps}: those attempts would never run"
                    )
            return list(self.steps)
        if max_steps is None or not _is_int(max_steps) or max_steps <= 0:
            raise ValueError(
                f"a fractional compression window {self.window} needs a known run length, but max_steps is "
                f"{max_steps!r}; set TrainingArguments(max_steps=...) or give explicit steps=[...]"
            )
        start, end = self.window
        points = [start + (end - start) * (i + 1) / self.attempts for i in range(self.attempts)]
        resolved = sorted({min(max_steps, max(1, round(max_steps * p))) for p in points})
        return resolved

    def to_dict(self) -> dict:
        """JSON-friendly description (used by the callback's exported state and the report)."""
        if self.steps is not None:
            return {"steps": list(self.steps)}
        return {"window": list(self.window), "attempts": self.attempts}
