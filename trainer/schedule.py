"""Which optimizer steps attempt a reduction.

The paper (and the legacy code) attempts a reduction at 4 equally spaced points inside the
learning-rate warm-up, the first 10% of training: for 100k steps at 2.5k, 5k, 7.5k and 10k.
:class:`CompressionSchedule` describes such a schedule without knowing the run length, and
:meth:`CompressionSchedule.resolve` turns it into concrete optimizer steps once the Trainer knows
``state.max_steps`` (at ``on_train_begin``).

Three ways to describe a schedule:

* ``CompressionSchedule()`` -- the default (the paper's, from :mod:`.defaults`): ``attempts=4``
  equally spaced inside the fraction window ``(0.0, 0.1]`` of ``max_steps``;
* ``CompressionSchedule(window=(0.05, 0.3), attempts=3)`` -- another window or count
  (attempt ``i`` of ``k`` sits at ``start + (end - start) * i / k``, so the last one is at ``end``);
* ``CompressionSchedule(steps=[100, 200, 400])`` -- explicit optimizer steps (1-based, the value
  of ``state.global_step`` after the step, as seen by ``on_step_end``).

Short runs: with the default window a 200-step run attempts at steps 5, 10, 15 and 20, only 5 steps
apart, so a selective (Mamba) layer collects its surrogate statistics from 5 batches instead of
``statistics_steps=8``. :meth:`CompressionSchedule.short_run_advice` says so, and what to change; the
callback raises it once, before training, as a :class:`ShortRunWarning`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import defaults

__all__ = ["CompressionSchedule", "ShortRunWarning"]


class ShortRunWarning(UserWarning):
    """The run is too short for the compression schedule: attempts merged after rounding, or attempts
    closer together than ``statistics_steps`` (Mamba layers then build their surrogate from fewer
    batches). Raised once, at ``on_train_begin``; the message names the step count and what to change."""


def _count(n: int, noun: str) -> str:
    """``"1 batch"``, ``"5 batches"``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'ch')) else 's'}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompressionSchedule:
    """When to attempt a reduction, relative to the run length or as explicit steps.

    Args:
        window: ``(start, end)`` fractions of ``max_steps`` with ``0 <= start < end <= 1``
            (default ``(0.0, 0.1)``: the paper's learning-rate warm-up). Ignored when ``steps`` is given.
        attempts: number of equally spaced attempts inside the window (``>= 1``; default 4, the paper's).
        steps: explicit optimizer steps (positive integers); overrides ``window``/``attempts``.

    Raises:
        ValueError: at construction, for a malformed window, attempt count or step list;
            at :meth:`resolve`, when ``max_steps`` is unknown (``<= 0``) for a fractional window,
            or when an explicit step is beyond ``max_steps``.
    """

    window: tuple[float, float] = defaults.WINDOW
    attempts: int = defaults.ATTEMPTS
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

    def short_run_advice(
        self, max_steps: int, statistics_steps: int, *, needs_statistics: bool = True
    ) -> str | None:
        """Why this schedule does not fit a ``max_steps`` run, and what to change; ``None`` when it fits.

        Two problems are reported: a fractional schedule whose attempts merge after rounding (fewer
        distinct steps than ``attempts``), and, when ``needs_statistics`` (the model has selective layers),
        an attempt fewer than ``statistics_steps`` optimizer steps after the previous one (or after the
        start), so that its surrogate comes from fewer batches. The advice names a ``max_steps`` that fits,
        a window that fits this run (when one exists) and the ``statistics_steps`` that would.
        """
        steps = self.resolve(max_steps)
        gaps = [b - a for a, b in zip([0, *steps], steps)]
        merged = self.is_fractional and len(steps) < self.attempts
        starved = needs_statistics and min(gaps) < statistics_steps
        if not (merged or starved):
            return None
        problems = []
        if merged:
            problems.append(f"only {len(steps)} of the {self.attempts} attempts are distinct steps")
        if starved:
            problems.append(
                f"some attempt comes only {_count(min(gaps), 'optimizer step')} after the previous one, so "
                f"selective (Mamba) layers build their surrogate from {_count(min(gaps), 'batch')} instead of "
                f"statistics_steps={statistics_steps}"
            )
        fixes = []
        enough = self._steps_needed(max_steps, statistics_steps if needs_statistics else 1)
        if enough is not None:
            fixes.append(f"train for max_steps >= {enough}")
        if self.is_fractional:
            window = self._window_that_fits(max_steps, statistics_steps if needs_statistics else 1)
            if window is not None:
                fixes.append(f"widen the window to ({window[0]:g}, {window[1]:g})")
            if self.attempts > 1:
                fixes.append("use fewer attempts")
        else:
            fixes.append(f"space the explicit steps at least {statistics_steps} apart")
        if starved:
            fixes.append(f"set statistics_steps={min(gaps)} to accept fewer batches")
        return (
            f"CompreSSM: a {max_steps}-step run puts the compression attempts at steps {steps}: "
            + "; ".join(problems)
            + ". To change it: "
            + ", or ".join(fixes)
            + " (same names on the compressm-train command line: --max_steps, --window, --attempts, "
            "--statistics_steps)."
        )

    def _fits(self, max_steps: int, gap: int) -> bool:
        steps = self.resolve(max_steps)
        gaps = [b - a for a, b in zip([0, *steps], steps)]
        return len(steps) == (self.attempts if self.is_fractional else len(self.steps)) and min(gaps) >= gap

    def _steps_needed(self, max_steps: int, gap: int) -> int | None:
        """The smallest run length (>= ``max_steps``) at which the schedule fits, for a fractional one."""
        if not self.is_fractional:
            return None
        start, end = self.window
        spacing = min(start + (end - start) / self.attempts, (end - start) / self.attempts)
        guess = max(max_steps, math.ceil(gap / spacing))
        for candidate in range(max(max_steps, guess - 2), guess + self.attempts + 3):
            if self._fits(candidate, gap):
                return candidate
        return guess

    def _window_that_fits(self, max_steps: int, gap: int) -> tuple[float, float] | None:
        """A window with the same start (two decimals) that fits ``max_steps``, or None if none does."""
        start = self.window[0]
        for hundredths in range(math.ceil(self.window[1] * 100), 101):
            end = hundredths / 100
            if end > start and CompressionSchedule(window=(start, end), attempts=self.attempts)._fits(
                max_steps, gap
            ):
                return (start, end)
        return None

    def to_dict(self) -> dict:
        """JSON-friendly description (used by the callback's exported state and the report)."""
        if self.steps is not None:
            return {"steps": list(self.steps)}
        return {"window": list(self.window), "attempts": self.attempts}
