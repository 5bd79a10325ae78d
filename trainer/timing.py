"""Per-step wall and process CPU time of a run, the cost of compressing, and the speed-up it bought.

Wall-clock steps before and after a cut inside one run are two different moments of a machine that may
be shared: when other jobs start in between, a compressed step can look slower than a full-size one.
So every step is timed twice: wall time (``time.perf_counter``) and this process's CPU time
(``time.process_time``: all its threads), which does not count time spent waiting for other processes.
From the CPU times :func:`run_timing` estimates, per state size, the median cost of a step, and from
those what the same steps would have cost at full size.

:class:`StepTimer` (a ``TrainerCallback``) records the steps; put it *before* the
``CompreSSMCallback`` so that its ``on_step_end`` stops the clocks before a cut runs (a cut's own cost
is the event's ``cpu_time_s`` / ``wall_time_s`` in the callback's history).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

__all__ = ["MEASURED_WITH", "StepTimer", "add_timing_to_report", "run_timing", "timing_lines"]

MEASURED_WITH = (
    "process CPU time per optimizer step (time.process_time: all threads of this process, forward + "
    "backward + optimizer), median per state size; wall time per step beside it depends on the machine's load"
)


class StepTimer(TrainerCallback):
    """Wall and process CPU time of every optimizer step (forward, backward, optimizer).

    Args:
        model: the model whose reducible layers are inspected at each step end (state size, whether
            they collected surrogate statistics during the step).
        tokens_per_step: tokens of one optimizer step (for :meth:`tokens_per_second`).
        skip_first: the first steps (warm-up, first-use kernel build) left out of every median.

    Attributes:
        records: one dict per step: ``step``, ``seconds`` (wall), ``cpu_seconds``, ``statistics`` (bool),
            ``total_state_size`` (sum over reducible layers).
    """

    def __init__(self, model, tokens_per_step: int, skip_first: int = 2):
        self.model = model
        self.tokens_per_step = int(tokens_per_step)
        self.skip_first = int(skip_first)
        self.records: list[dict] = []
        self._t0: tuple[float, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = (time.perf_counter(), time.process_time())
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return control
        wall, cpu = time.perf_counter() - self._t0[0], time.process_time() - self._t0[1]
        from compressm_hf import find_reducible_layers

        layers = find_reducible_layers(self.model)
        self.records.append(
            {
                "step": int(state.global_step),
                "seconds": wall,
                "cpu_seconds": cpu,
                "statistics": any(getattr(layer, "collect_statistics", False) for layer in layers),
                "total_state_size": sum(int(layer.state_size) for layer in layers),
            }
        )
        self._t0 = None
        return control

    def tokens_per_second(
        self, first: int | None = None, last: int | None = None
    ) -> tuple[float | None, int]:
        """Median-based wall-clock tokens/s over clean steps (no statistics, after the warm-up) with
        ``first <= step <= last``; returns ``(value or None, steps used)``."""
        times = [
            r["seconds"]
            for r in _clean(self.records, self.skip_first)
            if (first is None or r["step"] >= first) and (last is None or r["step"] <= last)
        ]
        if not times:
            return None, 0
        return self.tokens_per_step / statistics.median(times), len(times)


def _clean(records: Sequence[Mapping], skip_first: int) -> list[Mapping]:
    return [r for r in records if r["step"] > skip_first and not r["statistics"]]


def _median_by_size(records: Sequence[Mapping], key: str) -> dict[int, float]:
    by_size: dict[int, list[float]] = {}
    for r in records:
        by_size.setdefault(int(r["total_state_size"]), []).append(float(r[key]))
    return {size: statistics.median(v) for size, v in by_size.items()}


def run_timing(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    skip_first: int = 2,
) -> dict | None:
    """What a run's steps cost, what compressing cost, and the speed-up, from :class:`StepTimer` records.

    Args:
        records: :attr:`StepTimer.records` (``step``, ``seconds``, ``cpu_seconds``, ``statistics``,
            ``total_state_size``).
        events: the ``CompreSSMCallback`` history (``kind="reduction"`` events carry ``wall_time_s`` and
            ``cpu_time_s`` of planning + ``reduce_`` + optimizer surgery).
        skip_first: warm-up steps left out of the medians (their time still counts in the totals).

    Returns:
        None without records; else a JSON-able dict: ``measured_with``, ``steps_timed``, ``run_cpu_s`` /
        ``run_wall_s`` (steps + events), per-step medians at full and final size (``full_size``,
        ``final_size``: ``total_state_size``, ``cpu_s_per_step``, ``wall_s_per_step``, ``steps``),
        ``step_speedup_cpu`` / ``step_speedup_wall``, ``full_run_cpu_estimate_s`` (these steps at full
        size), ``ideal_run_cpu_s`` (these steps at their sizes without compression work; both count the
        warm-up steps as measured and every other step at the median of its size),
        ``end_to_end_speedup_cpu`` (measured) and ``ideal_speedup_cpu``, ``saved_cpu_s``, and
        ``compression_work`` (``statistics_steps``, ``statistics_cpu_s``: the extra CPU time of the
        statistics steps over clean steps of the same size; ``planning_and_surgery_cpu_s`` / ``_wall_s``;
        ``total_cpu_s``; ``fraction_of_run``).
    """
    if not records:
        return None
    clean = _clean(records, skip_first) or list(records)
    cpu_by_size = _median_by_size(clean, "cpu_seconds")
    wall_by_size = _median_by_size(clean, "seconds")
    fallback_cpu = _median_by_size(records, "cpu_seconds")  # sizes that had only statistics steps

    def step_cost(size: int) -> float:
        return cpu_by_size.get(size, fallback_cpu[size])

    ordered = sorted(records, key=lambda r: r["step"])
    full, final = int(ordered[0]["total_state_size"]), int(ordered[-1]["total_state_size"])
    reductions = [e for e in events if e.get("kind") == "reduction"]
    surgery_cpu = sum(float(e.get("cpu_time_s", e.get("wall_time_s", 0.0))) for e in reductions)
    surgery_wall = sum(float(e.get("wall_time_s", 0.0)) for e in reductions)
    stats_steps = [r for r in records if r["statistics"]]
    stats_cpu = max(
        0.0, sum(float(r["cpu_seconds"]) - step_cost(int(r["total_state_size"])) for r in stats_steps)
    )

    run_cpu = sum(float(r["cpu_seconds"]) for r in records) + surgery_cpu
    run_wall = sum(float(r["seconds"]) for r in records) + surgery_wall
    # warm-up steps (first-use costs, at full size in any run) count as measured; the others at the median
    warm = [r for r in records if r["step"] <= skip_first and int(r["total_state_size"]) == full]
    warm_cpu = sum(float(r["cpu_seconds"]) for r in warm)
    rest = [r for r in records if not any(r is w for w in warm)]
    ideal = warm_cpu + sum(step_cost(int(r["total_state_size"])) for r in rest)
    full_estimate = warm_cpu + len(rest) * step_cost(full)
    work = stats_cpu + surgery_cpu

    def size_record(size: int) -> dict:
        return {
            "total_state_size": size,
            "cpu_s_per_step": step_cost(size),
            "wall_s_per_step": wall_by_size.get(size),
            "steps": sum(1 for r in clean if int(r["total_state_size"]) == size),
        }

    def ratio(a, b):
        return a / b if a and b else None

    return {
        "measured_with": MEASURED_WITH,
        "steps_timed": len(records),
        "run_cpu_s": run_cpu,
        "run_wall_s": run_wall,
        "full_size": size_record(full),
        "final_size": size_record(final),
        "step_speedup_cpu": ratio(step_cost(full), step_cost(final)),
        "step_speedup_wall": ratio(wall_by_size.get(full), wall_by_size.get(final)),
        "full_run_cpu_estimate_s": full_estimate,
        "ideal_run_cpu_s": ideal,
        "end_to_end_speedup_cpu": ratio(full_estimate, run_cpu),
        "ideal_speedup_cpu": ratio(full_estimate, ideal),
        "saved_cpu_s": full_estimate - run_cpu,
        "compression_work": {
            "statistics_steps": len(stats_steps),
            "statistics_cpu_s": stats_cpu,
            "planning_and_surgery_cpu_s": surgery_cpu,
            "planning_and_surgery_wall_s": surgery_wall,
            "events": len(reductions),
            "total_cpu_s": work,
            "fraction_of_run": work / run_cpu if run_cpu > 0 else None,
        },
    }


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"x{value:.2f}"


def timing_lines(timing: Mapping[str, Any] | None, compressed: bool = True) -> list[str]:
    """The summary lines for :func:`run_timing`'s result (none for None)."""
    if not timing:
        return []
    full, final = timing["full_size"], timing["final_size"]

    def per_step(rec) -> str:
        wall = rec["wall_s_per_step"]
        wall_txt = "" if wall is None else f" / {wall:.3f} s wall"
        return f"{rec['cpu_s_per_step']:.3f} s CPU{wall_txt}"

    if not compressed or full["total_state_size"] == final["total_state_size"]:
        return [f"time per step (median): {per_step(final)}; CPU time = {MEASURED_WITH}"]
    work = timing["compression_work"]
    fraction = work["fraction_of_run"]
    return [
        f"time per step (median, statistics steps left out): full size ({full['total_state_size']} states) "
        f"{per_step(full)}; compressed ({final['total_state_size']} states) {per_step(final)}",
        f"  speed-up per step: {_x(timing['step_speedup_cpu'])} in CPU time "
        f"({_x(timing['step_speedup_wall'])} in wall time, which also counts other jobs on the machine)",
        f"end-to-end estimate: these {timing['steps_timed']} steps would take "
        f"{timing['full_run_cpu_estimate_s']:.1f} s CPU at full size; this run took {timing['run_cpu_s']:.1f} s: "
        f"{_x(timing['end_to_end_speedup_cpu'])} (ideal {_x(timing['ideal_speedup_cpu'])}), "
        f"{timing['saved_cpu_s']:.1f} s CPU saved",
        f"compression work: {work['total_cpu_s']:.2f} s CPU"
        + ("" if fraction is None else f" = {fraction:.2%} of the run")
        + f" (statistics, {work['statistics_steps']} steps: {work['statistics_cpu_s']:.2f} s over a plain step; "
        f"planning + surgery, {work['events']} events: {work['planning_and_surgery_cpu_s']:.2f} s)",
        f"  how: {MEASURED_WITH}",
    ]


def add_timing_to_report(path, timing: Mapping[str, Any] | None) -> bool:
    """Store ``timing`` as the ``"timing"`` entry of the ``compression_report.json`` at ``path`` (atomic
    rewrite); returns False (and changes nothing) when there is no report there or no timing."""
    from .report import read_report, write_report

    if not timing:
        return False
    try:
        report = read_report(path)
    except FileNotFoundError:
        return False
    report["timing"] = dict(timing)
    write_report(path, report)
    return True
