"""What ``compressm-train`` logs while it runs: every ``Trainer.log`` payload into ``train_log.jsonl``
(:class:`JsonlLogger`), the log levels of the process, and the timing line of the summary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments

__all__ = ["LOG_NAME", "JsonlLogger", "configure_logging", "fmt_rate", "time_line"]

LOG_NAME = "train_log.jsonl"


class JsonlLogger(TrainerCallback):
    """Appends every ``Trainer.log`` payload (losses, evals, ``compressm/...`` metrics) to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not state.global_step:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", "utf-8")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        return control


def fmt_rate(value: float | None, steps: int) -> str:
    """``"12,345 tokens/s (median of 80 steps)"``, or ``"n/a"`` without a rate."""
    return "n/a" if value is None else f"{value:,.0f} tokens/s (median of {steps} steps)"


def time_line(train_time: float, wall_time: float, wall_covers: str = "") -> str:
    """``training time: 40.1 s; total wall time: 87.6 s (from process start)``."""
    covers = f" ({wall_covers})" if wall_covers else ""
    return f"training time: {train_time:.1f} s; total wall time: {wall_time:.1f} s{covers}"


def configure_logging(training_args: TrainingArguments) -> None:
    """Log format and levels: compression events at INFO on the main process unless ``--log_level`` says otherwise."""
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # compression events are announced on the main process (INFO) unless --log_level says otherwise
    main_level = logging.INFO if training_args.log_level in (None, "passive") else level
    logging.getLogger("compressm_hf").setLevel(main_level if training_args.process_index == 0 else level)
