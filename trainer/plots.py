"""Plots of a compression report: Hankel singular value spectra (every event) and state sizes over training.

Both functions take the dict stored in ``compression_report.json`` (see ``trainer/report.py``) and write a
PNG. matplotlib is an optional dependency (``pip install compressm-hf[plots]``) and is imported only when a
plot is drawn. The figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never with
``pyplot``, so drawing does not touch global state, does not need a display and is safe in a training process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "HSV_PLOT_NAME",
    "STATE_SIZES_PLOT_NAME",
    "events_per_layer",
    "hsv_spectra_figure",
    "normalize_report",
    "plot_hsv_spectra",
    "plot_state_sizes",
]

HSV_PLOT_NAME = "hsv_spectra.png"
STATE_SIZES_PLOT_NAME = "state_sizes.png"

_DPI = 120
_DROP_COLOR = "#d62728"


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "Plotting a compression report needs matplotlib, which is not installed. "
            "Install it with `pip install compressm-hf[plots]` (or `pip install matplotlib`)."
        ) from err
    return Figure, FigureCanvasAgg


def _save(fig, canvas_cls, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    canvas_cls(fig)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, (list, tuple)):
        return [int(n) for n in value]
    return None


def normalize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """One reading of the report formats in use, tolerant of missing and extra keys.

    Accepts both the field names of ``trainer/report.py`` (``config.tau``, ``original_sizes``, ``final_sizes``,
    ``layer_idx``, ``kind``/``sizes_after`` events with ``reduced`` flags and rollbacks) and the flat ones
    (``tau``, ``mode``, ``original_state_sizes``, ``final_state_sizes``, ``layer``). Returns ``{"tau", "mode",
    "original_state_sizes", "final_state_sizes", "events", "rollbacks"}``: ``events`` sorted by step, each
    ``{"step", "wall_time_s", "sizes_after", "layers": [{"layer", "n_before", "n_after", "reduced", "hsv",
    "energy_kept", "error_bound", "rule", "selection"}]}``; a rollback event has ``"kind": "rollback"``.
    """
    config = report.get("config") if isinstance(report.get("config"), Mapping) else {}
    tau = report.get("tau", config.get("tau"))
    mode = report.get("mode", config.get("mode"))
    original = _int_list(report.get("original_state_sizes")) or _int_list(report.get("original_sizes"))
    final = _int_list(report.get("final_state_sizes")) or _int_list(report.get("final_sizes"))
    events = []
    for event in report.get("events") or []:
        if not isinstance(event, Mapping):
            continue
        layers = []
        for entry in event.get("layers") or []:
            layer = entry.get("layer", entry.get("layer_idx"))
            if layer is None or "n_before" not in entry or "n_after" not in entry:
                continue
            n_before, n_after = int(entry["n_before"]), int(entry["n_after"])
            layers.append(
                {
                    **entry,
                    "layer": int(layer),
                    "n_before": n_before,
                    "n_after": n_after,
                    "reduced": bool(entry.get("reduced", n_after < n_before)),
                }
            )
        events.append(
            {
                **event,
                "kind": event.get("kind", "reduction"),
                "step": int(event.get("step", 0)),
                "sizes_after": _int_list(event.get("sizes_after")),
                "layers": sorted(layers, key=lambda e: e["layer"]),
            }
        )
    events.sort(key=lambda e: e["step"])
    if original is None:  # rebuild from the first mention of each layer
        first: dict[int, int] = {}
        for event in events:
            for entry in event["layers"]:
                first.setdefault(entry["layer"], entry["n_before"])
        original = (
            [first[i] for i in sorted(first)] if first and sorted(first) == list(range(len(first))) else []
        )
    if final is None:
        final = list(original)
        for event in events:
            if event["sizes_after"] is not None and len(event["sizes_after"]) == len(final):
                final = list(event["sizes_after"])
            for entry in event["layers"]:
                if entry["layer"] < len(final):
                    final[entry["layer"]] = entry["n_after"]
    return {
        "tau": tau,
        "mode": mode,
        "original_state_sizes": original,
        "final_state_sizes": final,
        "events": [e for e in events if e["kind"] != "rollback"],
        "rollbacks": [e for e in events if e["kind"] == "rollback"],
        "all_events": events,
    }


def state_size_history(report: Mapping[str, Any]) -> tuple[list[int], dict[int, list[int]]]:
    """Steps ``[0, step_1, step_2, ...]`` and, per layer, its state size from each of those steps on.

    Rollback events (pragmatic mode) restore the sizes they name in ``sizes_after``.
    """
    norm = normalize_report(report)
    current = list(norm["original_state_sizes"])
    for event in norm["all_events"]:
        for entry in event["layers"]:
            if entry["layer"] >= len(current):  # a layer missing from original_state_sizes
                current.extend([entry["n_before"]] * (entry["layer"] + 1 - len(current)))
    steps = [0]
    history = {layer: [n] for layer, n in enumerate(current)}
    for event in norm["all_events"]:
        sizes_after = event["sizes_after"]
        if sizes_after is not None and len(sizes_after) == len(current):
            current = list(sizes_after)
        for entry in event["layers"]:
            current[entry["layer"]] = entry["n_after"]
        steps.append(event["step"])
        for layer, n in enumerate(current):
            history[layer].append(n)
    return steps, history


def _grid(n_panels: int, max_cols: int = 4) -> tuple[int, int]:
    ncols = max(1, min(max_cols, n_panels))
    return math.ceil(n_panels / ncols), ncols


def events_per_layer(report: Mapping[str, Any]) -> dict[int, list[tuple[int, Mapping[str, Any]]]]:
    """``{layer: [(step, layer_entry), ...]}``: every event that planned each layer (its entry holds an HSV
    spectrum), in step order. Attempts where the layer was skipped or gated without a spectrum are left out."""
    found: dict[int, list[tuple[int, Mapping[str, Any]]]] = {}
    for event in normalize_report(report)["events"]:
        for entry in event["layers"]:
            if entry.get("hsv"):
                found.setdefault(entry["layer"], []).append((event["step"], entry))
    return dict(sorted(found.items()))


def _finite_for_log(hsv: Sequence[float]) -> list[float]:
    """``hsv`` with zeros / NaN / Inf replaced by a floor below the smallest positive value (log axis)."""
    values = [float(v) for v in hsv]
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    floor = min(positive) * 1e-3 if positive else 1e-12
    return [v if v > 0 and math.isfinite(v) else floor for v in values]


def hsv_spectra_figure(report: Mapping[str, Any]):
    """The figure of :func:`plot_hsv_spectra` (a ``matplotlib.figure.Figure``, not saved).

    One panel per layer; in it, the spectrum of every compression event that planned the layer, one color
    per event from light (first) to dark (last), each labelled ``step S: n_before -> n_after`` with the
    energy kept, and its cut drawn as a dashed line in the same color. The states the last event discarded
    are shaded. The y axis is logarithmic; states are numbered 1..n_before in decreasing order.
    """
    Figure, _ = _require_matplotlib()
    per_layer = events_per_layer(report)
    norm = normalize_report(report)
    tau, mode = norm["tau"], norm["mode"]

    if not per_layer:
        fig = Figure(figsize=(6.0, 2.5), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "No compression event in this report.", ha="center", va="center", fontsize=12)
        return fig

    nrows, ncols = _grid(len(per_layer))
    fig = Figure(figsize=(4.6 * ncols, 3.5 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(per_layer) :]:
        ax.axis("off")

    for ax, (layer, events) in zip(axes.flat, per_layer.items()):
        colors = _event_colors(len(events))
        longest = 1
        for i, (step, entry) in enumerate(events):
            values = _finite_for_log(entry["hsv"])
            longest = max(longest, len(values))
            n_after, last = int(entry["n_after"]), i == len(events) - 1
            energy = entry.get("energy_kept")
            label = f"step {step}: {entry['n_before']} \u2192 {n_after}"
            label += (
                f", kept {_format_fraction(float(energy))}" if energy is not None and entry["reduced"] else ""
            )
            label += "" if entry["reduced"] else " (not cut)"
            xs = list(range(1, len(values) + 1))
            ax.plot(
                xs,
                values,
                color=colors[i],
                marker="o",
                markersize=3.0 if last else 2.0,
                linewidth=1.5 if last else 0.9,
                zorder=2 + i,
                label=label,
            )
            if entry["reduced"] and n_after < len(values):
                ax.axvline(n_after + 0.5, color=colors[i], linestyle="--", linewidth=1.0, zorder=1)
                if last:
                    ax.axvspan(n_after + 0.5, len(values) + 0.5, color=_DROP_COLOR, alpha=0.1, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlim(0.5, longest + 0.5)
        first_n, final_n = int(events[0][1]["n_before"]), int(events[-1][1]["n_after"])
        count = f"{len(events)} event{'s' if len(events) != 1 else ''}"
        ax.set_title(f"layer {layer}: {first_n} \u2192 {final_n} ({count})", fontsize=10)
        ax.set_xlabel("state index (sorted)", fontsize=9)
        ax.set_ylabel(
            "Hankel importance (modal)" if events[-1][1].get("rule") == "modal" else "Hankel singular value",
            fontsize=9,
        )
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", frameon=False)

    rules = {entry.get("rule") for events in per_layer.values() for _, entry in events}
    header = (
        "Hankel importance of each state (modal, averaged surrogate) at every compression event"
        if rules == {"modal"}
        else "Hankel singular values at every compression event"
    )
    tau_txt = f"\u03c4 = {tau:g}" if isinstance(tau, (int, float)) else ""
    details = ", ".join(s for s in (tau_txt, f"mode {mode}" if mode else "") if s)
    fig.suptitle(f"{header} ({details})" if details else header, fontsize=11)
    return fig


def plot_hsv_spectra(report: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write :func:`hsv_spectra_figure` (every event's spectrum per layer, with its cut) to ``path``."""
    _, FigureCanvasAgg = _require_matplotlib()
    return _save(hsv_spectra_figure(report), FigureCanvasAgg, path)


def plot_state_sizes(report: Mapping[str, Any], path: str | os.PathLike, max_steps: int | None = None) -> str:
    """Draw the state size of every layer over training steps (a step plot) and the total below it.

    ``max_steps`` extends the last segment to the end of training; by default the plot ends a little after the
    last event. Returns ``path``.
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    steps, history = state_size_history(report)
    last = steps[-1]
    end = int(max_steps) if max_steps is not None and max_steps > last else max(last + max(1, last // 4), 1)
    xs = [*steps, end]

    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_layers, ax_total = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1.0])
    n_layers = len(history)
    if n_layers == 0:
        ax_layers.text(0.5, 0.5, "No state sizes in this report.", ha="center", va="center")
    colors = _palette(n_layers)
    linestyles = ["-", "--", "-.", ":"]
    for i, (layer, sizes) in enumerate(sorted(history.items())):
        ys = [*sizes, sizes[-1]]
        ax_layers.step(
            xs,
            ys,
            where="post",
            color=colors[i],
            linestyle=linestyles[(i // 10) % len(linestyles)],
            linewidth=1.6,
            label=f"layer {layer}",
        )
    labelled: set[str] = set()
    for event in normalize_report(report)["all_events"]:
        rollback = event["kind"] == "rollback"
        label = "rollback" if rollback else "compression event"
        style = {"color": _DROP_COLOR, "linestyle": ":"} if rollback else {"color": "0.7"}
        ax_layers.axvline(
            event["step"], linewidth=0.9, zorder=0, label=None if label in labelled else label, **style
        )
        ax_total.axvline(event["step"], linewidth=0.9, zorder=0, **style)
        labelled.add(label)

    totals = [sum(sizes[k] for sizes in history.values()) for k in range(len(steps))]
    if totals:
        original_total = totals[0] or 1
        ax_total.step(xs, [*totals, totals[-1]], where="post", color="k", linewidth=1.8)
        ax_total.set_ylim(0, max(totals) * 1.3 + 1)
        ax_total.text(
            0.99,
            0.95,
            f"final total {totals[-1]} of {totals[0]} ({totals[-1] / original_total:.0%})",
            transform=ax_total.transAxes,
            ha="right",
            va="top",
            fontsize=9,
        )

    from matplotlib.ticker import MaxNLocator

    for ax in (ax_layers, ax_total):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    max_size = max((max(s) for s in history.values()), default=1)
    ax_layers.set_ylim(0, max_size * 1.1 + 1)
    ax_layers.set_ylabel("state size n")
    ax_layers.set_title("State size per layer during training", fontsize=11)
    ax_layers.grid(True, alpha=0.3)
    if n_layers:
        ax_layers.legend(
            fontsize=8,
            ncol=max(1, math.ceil((n_layers + 1) / 9)),
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
    ax_total.set_ylabel("total state size")
    ax_total.set_xlabel("training step")
    ax_total.grid(True, alpha=0.3)
    ax_total.set_xlim(0, end)
    return _save(fig, FigureCanvasAgg, path)


def _format_fraction(value: float) -> str:
    """``0.987`` -> ``98.7%``; values within 5e-4 of 1 as ``1 - 3.2e-11`` (``100.0%`` would hide the cut)."""
    if 0.0 <= 1.0 - value < 5e-4:
        return f"1 \u2212 {1.0 - value:.1e}" if value < 1.0 else "100%"
    return f"{value:.1%}"


def _event_colors(n: int) -> list[Any]:
    """``n`` colors from light to dark blue: earlier events lighter, the last one darkest."""
    from matplotlib import colormaps

    cmap = colormaps["Blues"]
    return [cmap(0.95)] if n == 1 else [cmap(0.4 + 0.55 * i / (n - 1)) for i in range(n)]


def _palette(n: int) -> Sequence[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
