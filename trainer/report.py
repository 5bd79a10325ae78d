"""``compression_report.json``: what every compression event did, and the Trainer log payloads.

Format (``format="compressm-hf/compression-report"``, ``version=1``)::

    {
      "format": "compressm-hf/compression-report",
      "version": 1,
      "config": {"tau": 0.05, "mode": "tolerance", "schedule": {...}, "gate": 0.95, ...},
      "schedule_steps": [25, 50, 75, 100],
      "original_sizes": [64, 64],          # per layer (layer_idx order), at the start of training
      "final_sizes": [31, 27],             # after the last event (what the model has now)
      "stopped": false,                    # pragmatic mode: cutting stopped after a rollback
      "training_stopped": null,            # on_nonfinite="stop": why the callback stopped the training
      "health": [                          # non-finite / no-signal training noticed by the callback
        {"step": 40, "at": "attempt",      # "attempt" (the attempt was skipped) or "train_end"
         "action": "skipped",              # "skipped", "stopped" (training stopped) or "warned"
         "problems": ["non-finite values in 3 trainable parameter(s): ..."]}
      ],
      "events": [
        {
          "kind": "reduction",             # or "rollback" (pragmatic mode)
          "step": 25,                      # optimizer step (state.global_step) of the event
          "epoch": 0.1,
          "sizes_before": [64, 64], "sizes_after": [40, 38],
          "wall_time_s": 0.012,            # whole event: planning + reduce_ + optimizer surgery
          "cpu_time_s": 0.012,             # the same, process CPU time (all threads)
          "layers": [
            {
              "layer_idx": 0, "n_before": 64, "n_after": 40, "reduced": true,
              "rule": "balanced", "selection": "largest",
              "hsv": [...],                # (n_before,) descending (modal layers: importance scores)
              "energy_kept": 0.991, "error_bound": 0.034,
              "wall_time_s": 0.004,        # planning + reduce_ of this layer
              "extra": {...}               # core diagnostics (clamped eigenvalues, ...)
            },
            {"layer_idx": 1, "n_before": 64, "n_after": 64, "reduced": false, "reason": "gate", ...}
          ]
        },
        {"kind": "rollback", "step": 40, "restored_step": 25, "metric": "eval_loss",
         "metric_before": 1.20, "metric_after": 1.31, "sizes_before": [...], "sizes_after": [...]},
        {"kind": "reduction", "step": 30,   # with a state budget (target_total_state / target_mean_state)
         "budget": {"target_total_state": 40, "schedule": "geometric", "attempt": 2, "attempts": 4,
                    "attempt_target": 80, "total_before": 90, "within_budget": false,
                    "tau": 0.031,            # the tau found for this attempt (shared by every layer)
                    "tau_interval": [0.029, 0.033],  # every tau in [low, high) gives the same sizes
                    "planned_total": 79, "met": true}, ...},
        {"kind": "reduction", "step": 50, "skipped": "non-finite values in ...",  # an attempt skipped
         "layers_reduced": 0, "sizes_after": [...], "layers": [{..., "reason": "skipped: ..."}]}
      ],
      "timing": {...}                      # compressm-train only: per-step CPU/wall time, speed-up and
    }                                      # compression work (compressm_hf.trainer.timing.run_timing)

:func:`write_report` writes atomically (temporary file + ``os.replace``), like :func:`save_torch_atomic`;
when such a write fails (full disk, quota, torch's ``inline_container.cc`` error) they raise
:class:`ReportWriteError` naming the file and leave the previous file intact. :func:`read_report`
accepts a file or a directory holding ``compression_report.json`` and checks the format.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

REPORT_NAME = "compression_report.json"
REPORT_FORMAT = "compressm-hf/compression-report"
REPORT_VERSION = 1
LOG_PREFIX = "compressm/"

__all__ = [
    "LOG_PREFIX",
    "REPORT_FORMAT",
    "REPORT_NAME",
    "REPORT_VERSION",
    "ReportWriteError",
    "build_report",
    "config_record",
    "event_log_payload",
    "jsonable",
    "read_report",
    "reduction_event",
    "save_torch_atomic",
    "write_report",
]


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of ``value`` (tensors -> lists, non-finite floats -> strings)."""
    try:
        import torch

        if torch.is_tensor(value):
            value = value.detach().cpu()
            if value.is_complex():
                return {"real": jsonable(value.real), "imag": jsonable(value.imag)}
            return jsonable(value.tolist())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def build_report(
    *,
    config: Mapping[str, Any],
    schedule_steps: list[int],
    original_sizes: list[int] | None,
    final_sizes: list[int] | None,
    events: list[Mapping[str, Any]],
    stopped: bool = False,
    health: list[Mapping[str, Any]] | None = None,
    training_stopped: str | None = None,
) -> dict:
    """The report dictionary (see the module docstring)."""
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "config": jsonable(dict(config)),
        "schedule_steps": [int(s) for s in schedule_steps],
        "original_sizes": None if original_sizes is None else [int(n) for n in original_sizes],
        "final_sizes": None if final_sizes is None else [int(n) for n in final_sizes],
        "stopped": bool(stopped),
        "training_stopped": training_stopped,
        "health": jsonable(list(health or [])),
        "events": jsonable(list(events)),
    }


def _report_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".json"):
        return os.path.join(path, REPORT_NAME)
    return path


class ReportWriteError(OSError):
    """A file of the callback (report, snapshot) could not be written; the previous file is intact.

    ``errno`` is the failed write's (``ENOSPC`` for a full disk, also when torch's ``inline_container``
    ``RuntimeError`` hides it and the disk has no space left), ``filename`` the file.
    """

    def __str__(self) -> str:  # the message names the file already; no "[Errno None]" prefix
        return str(self.strerror)


_FULL_DISK_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_LOW_SPACE_BYTES = 1 << 20


def _free_bytes(folder: str) -> int | None:
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _write_error(target: str, exc: BaseException) -> ReportWriteError:
    """The :class:`ReportWriteError` for a failed write of ``target`` (what happened, what to do)."""
    folder = os.path.dirname(target) or "."
    free = _free_bytes(folder)
    code = getattr(exc, "errno", None)
    full = code in _FULL_DISK_ERRNOS or (free is not None and free < _LOW_SPACE_BYTES)
    space = "" if free is None else f" ({free} bytes free in {folder})"
    if full:
        why = f"the disk is full (no space left on the device){space}"
        code = code if code in _FULL_DISK_ERRNOS else errno.ENOSPC
    elif isinstance(exc, OSError):
        why = f"the write failed{space}"
    else:  # torch.save's RuntimeError (inline_container.cc): almost always a full disk or a quota
        why = f"the write failed, usually because the disk is full or over quota{space}"
    message = (
        f"could not write {target}: {why}: {type(exc).__name__}: {exc}. The previous version of the file, if "
        "any, is intact; free some space and resume from the last checkpoint"
    )
    return ReportWriteError(code, message, target)


def _atomic_write(target: str, write, prefix: str) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``target``, then ``os.replace`` it onto ``target``.

    Raises:
        ReportWriteError: the write or the rename failed (``OSError``, or torch's ``RuntimeError``);
            the temporary file is removed and ``target`` is left as it was.
    """
    folder = os.path.dirname(target) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    try:
        os.close(fd)
        write(tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:
        _remove_quietly(tmp)
        raise _write_error(target, exc) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    return target


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> str:
    """Write ``report`` to ``path`` (a directory gets ``compression_report.json``). Returns the file.

    Raises:
        ReportWriteError: the file could not be written (e.g. the disk is full); an earlier report
            at ``path`` is left intact.
    """
    target = _report_path(path)
    payload = jsonable(dict(report))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")

    return _atomic_write(target, write, ".compression_report.")


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``. Returns the file.

    Raises:
        ReportWriteError: the file could not be written (torch's ``inline_container.cc`` error on a full
            disk included); an earlier file at ``path`` is left intact.
    """
    import torch

    target = os.fspath(path)
    return _atomic_write(target, lambda tmp: torch.save(obj, tmp), f".{os.path.basename(target)}.")


def read_report(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report` (file or directory).

    Raises:
        FileNotFoundError: no report there.
        ValueError: the file is not a compressm-hf report, or of a newer format version.
    """
    target = _report_path(path)
    with open(target, encoding="utf-8") as f:
        report = json.load(f)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(
            f"{target} is not a compressm-hf compression report (format={report.get('format')!r})"
        )
    version = report.get("version")
    if not isinstance(version, int) or version > REPORT_VERSION:
        raise ValueError(
            f"{target} has report version {version!r}; this compressm-hf reads versions <= {REPORT_VERSION}"
        )
    return report


def config_record(
    *,
    tau: float | None,
    mode: str,
    original_sizes: list[int] | None,
    events: list[Mapping[str, Any]],
    target_total_state: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict:
    """The compact record stored in ``model.config.compression`` (no spectra; see the report).

    With a state budget (``target_total_state``, the budget as a total) ``tau`` is ``None`` and every
    event that searched one carries the ``tau`` found for it. ``settings`` (``CompreSSMConfig.to_dict()``)
    is stored as ``"settings"``, read back by ``CompreSSMConfig.from_pretrained``.
    """
    record = {
        "method": "CompreSSM (arXiv 2510.02823)",
        "tau": tau,
        "mode": mode,
        "original_sizes": None if original_sizes is None else [int(n) for n in original_sizes],
        "events": [_config_event(e) for e in events],
    }
    if target_total_state is not None:
        record["target_total_state"] = int(target_total_state)
    if settings is not None:
        record["settings"] = dict(settings)
    return record


def _config_event(event: Mapping[str, Any]) -> dict:
    out = {
        "kind": event.get("kind", "reduction"),
        "step": int(event["step"]),
        "sizes": [int(n) for n in event.get("sizes_after", [])],
    }
    tau = (event.get("budget") or {}).get("tau")
    if tau is not None:
        out["tau"] = float(tau)
    return out


def reduction_event(state, cut, optimizer_state: str) -> dict:
    """The report event of one cut: ``cut`` is a :class:`~compressm_hf.trainer.distributed_cut.TrainingCut`,
    ``state`` the ``TrainerState``; ``cpu_time_s`` is process CPU time (all threads)."""
    event = {
        "kind": "reduction",
        "step": int(state.global_step),
        "epoch": state.epoch,
        "sizes_before": cut.event.sizes_before,
        "sizes_after": cut.event.sizes_after,
        "layers_reduced": cut.event.layers_reduced,
        "optimizer_state": optimizer_state,
        "optimizer_counts": dict(cut.optimizer_counts),
        "wall_time_s": cut.wall_time_s,
        "cpu_time_s": cut.cpu_time_s,
        "layers": cut.event.layers,
    }
    if cut.event.budget is not None:
        event["budget"] = cut.event.budget
    return event


def event_log_payload(event: Mapping[str, Any], per_layer: bool = True) -> dict[str, float]:
    """Flat ``{name: number}`` metrics of one event, for ``Trainer.log``.

    Keys (prefix ``compressm/``): ``mean_state_size``, ``total_state_size``, ``layers_reduced``,
    ``reduction_time_s``, ``rolled_back`` (rollback events), ``attempt_skipped`` (an attempt skipped on a
    diverged / signal-free run), ``budget_target`` and ``budget_tau`` (state-budget attempts: the attempt's
    target total and the tau found for it, when one was searched); per reduced layer ``i`` (if
    ``per_layer``): ``layer_{i}/state_size``, ``layer_{i}/energy_kept``, ``layer_{i}/error_bound``.
    """
    sizes = [int(n) for n in event.get("sizes_after", [])]
    out: dict[str, float] = {}
    if sizes:
        out[LOG_PREFIX + "mean_state_size"] = float(sum(sizes) / len(sizes))
        out[LOG_PREFIX + "total_state_size"] = float(sum(sizes))
    if event.get("kind") == "rollback":
        out[LOG_PREFIX + "rolled_back"] = 1.0
        return out
    if event.get("skipped"):
        out[LOG_PREFIX + "attempt_skipped"] = 1.0
    budget = event.get("budget") or {}
    if budget.get("attempt_target") is not None:
        out[LOG_PREFIX + "budget_target"] = float(budget["attempt_target"])
    if budget.get("tau") is not None:
        out[LOG_PREFIX + "budget_tau"] = float(budget["tau"])
    layers = event.get("layers", [])
    out[LOG_PREFIX + "layers_reduced"] = float(sum(1 for layer in layers if layer.get("reduced")))
    if "wall_time_s" in event:
        out[LOG_PREFIX + "reduction_time_s"] = float(event["wall_time_s"])
    if per_layer:
        for layer in layers:
            i = layer["layer_idx"]
            out[f"{LOG_PREFIX}layer_{i}/state_size"] = float(layer["n_after"])
            if layer.get("reduced"):
                for key in ("energy_kept", "error_bound"):
                    value = layer.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        out[f"{LOG_PREFIX}layer_{i}/{key}"] = float(value)
    return out
