"""``CompreSSMCallback``: CompreSSM inside ``transformers.Trainer``.

At scheduled optimizer steps the callback shrinks every reducible SSM layer of the model (any
module implementing :class:`compressm_hf.ReducibleSSM`) by balanced or modal truncation, keeps
the optimizer and DDP consistent, records what happened in ``model.config`` and in
``compression_report.json``, and logs it through the Trainer.

Usage::

    from compressm_hf import CompreSSMCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CompreSSMCallback(tau=0.05)])
    trainer.train()

How the callback finds the Trainer
----------------------------------
Trainer events receive the model, optimizer, scheduler and dataloaders, but not the Trainer.
The callback needs it for two things: the DDP wrapper (``trainer.model_wrapped``, rebuilt in
place after a cut) and ``trainer.log`` / ``trainer.evaluate``. At ``on_train_begin`` it walks the
Python call stack (``Trainer._inner_training_loop`` -> ``CallbackHandler.on_train_begin`` ->
``call_event`` -> here) for the first frame whose ``self`` is a ``transformers.Trainer``
(subclasses included). :meth:`CompreSSMCallback.bind` sets it explicitly instead (and wins).

Lifecycle
---------
``on_train_begin``
    Validates everything that needs the run (schedule against ``state.max_steps``, a reducible
    layer exists, pragmatic mode has evaluation), restores the exported state on resume.
``on_pre_optimizer_step`` (only before the optimizer step of an attempt)
    Notes whether the gradient is exactly zero everywhere (no training signal; health check).
``on_step_end`` (after ``optimizer.step``, ``lr_scheduler.step`` and ``zero_grad``; it only fires
at optimizer-step boundaries, so never inside a gradient-accumulation cycle)
    At a scheduled step: check the run's health (NaN/Inf parameters or losses, zero gradient, loss 0:
    the attempt is skipped, see ``on_nonfinite``), plan every layer (rank 0 plans, the plans are
    broadcast), ``reduce_``, transplant the optimizer state, rebuild DDP in place, update ``config.state_sizes`` and
    ``config.compression``, log, write the report. The checkpoint/eval of the same step
    (``_maybe_log_save_evaluate`` runs right after) already sees the compressed model, and the
    training-loss entry of that step is still logged (``control.should_log`` is kept).
``on_evaluate`` (pragmatic mode)
    Compares the metric with the pre-cut one and rolls back if it dropped too much.
``on_save``
    Writes ``compression_report.json`` into ``{output_dir}/checkpoint-{global_step}``.
``on_train_end``
    Checks the parameters once more (a warning and a ``"health"`` entry if NaN/Inf) and writes the
    final report into ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from compressm_hf import RankPolicy, find_reducible_layers, plan_reduction
from compressm_hf.budget import (
    BUDGET_SCHEDULES,
    attempt_targets,
    budget_from_mean,
    minimum_total,
    tau_for_budget,
)
from compressm_hf.planning import rank_scores

from . import defaults
from .hub import protect_hub_token
from .peft_io import enable_compressed_adapter_saving
from .report import (
    REPORT_NAME,
    build_report,
    config_record,
    event_log_payload,
    jsonable,
    plan_record,
    save_torch_atomic,
    write_report,
)
from .schedule import CompressionSchedule, ShortRunWarning
from .surgery import (
    OPTIMIZER_STATE_MODES,
    apply_ddp_timeout,
    broadcast_objects,
    distributed_barrier,
    distributed_rank,
    is_distributed,
    rebuild_ddp_in_place_,
    restore_training_state,
    snapshot_training_state,
    transplant_optimizer_state,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "NONFINITE_ACTIONS",
    "SELECTIONS",
    "CompreSSMCallback",
    "NonFiniteTrainingWarning",
    "find_trainer",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "quarantine_incomplete_checkpoints",
]

MODES = ("tolerance", "fixed", "pragmatic")
SELECTIONS = ("largest", "smallest", "random")
NONFINITE_ACTIONS = ("warn", "stop")
SNAPSHOT_NAME = "compressm_pragmatic_snapshot.pt"


class NonFiniteTrainingWarning(UserWarning):
    """The training diverged (NaN/Inf parameters or losses) or learned nothing (no gradient, loss 0):
    CompreSSMCallback did not compress at that attempt (see ``on_nonfinite``)."""


def find_trainer(max_depth: int = 64):
    """The ``transformers.Trainer`` up the call stack (the ``self`` of a calling frame), or None."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < max_depth:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
            depth += 1
        return None
    finally:
        del frame


def _resume_checkpoint_on_stack(max_depth: int = 64) -> str | None:
    """``resume_from_checkpoint`` of the running ``Trainer.train``/``_inner_training_loop`` call, if any."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < max_depth:
            if isinstance(frame.f_locals.get("self"), Trainer):
                value = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(value, (str, os.PathLike)):
                    return os.fspath(value)
            frame = frame.f_back
            depth += 1
        return None
    finally:
        del frame


# ---------------------------------------------------------------------------- checkpoint integrity
#
# transformers 5.x writes ``checkpoint-N`` in place (no temporary folder + rename): weights, then
# optimizer/scheduler/scaler/RNG, then ``trainer_state.json`` (last, by the saving process), then
# rotation of old checkpoints, then ``on_save``. ``Trainer.train(resume_from_checkpoint=True)``
# takes the highest-numbered ``checkpoint-N`` folder whatever its content (``get_last_checkpoint``),
# so a process killed while saving leaves a folder that the next resume picks and fails on (or, if
# only the optimizer is missing, silently resumes with a fresh optimizer). A checkpoint is complete
# when its ``trainer_state.json`` parses and the weights are there.

_CHECKPOINT_RE = r"^checkpoint-(\d+)$"
_TRAINER_STATE = "trainer_state.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
INCOMPLETE_SUFFIX = ".incomplete"


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True if ``folder`` is a checkpoint ``Trainer`` finished writing (parseable ``trainer_state.json``
    with a ``global_step``, and a weights file). FSDP/DeepSpeed sharded layouts count as complete when
    ``trainer_state.json`` is valid (they are written before it)."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, _TRAINER_STATE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "global_step" not in data:
        return False
    names = set(os.listdir(folder))
    sharded = any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)
    return sharded or any(n in names for n in _WEIGHT_FILES)


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    import re

    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.match(_CHECKPOINT_RE, name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (see :func:`is_complete_checkpoint`)."""
    for _, path in reversed(_checkpoint_folders(os.fspath(output_dir))):
        if is_complete_checkpoint(path):
            return path
    return None


def quarantine_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Rename every incomplete ``checkpoint-N`` in ``output_dir`` to ``checkpoint-N.incomplete[-k]``.

    Nothing is deleted; the renamed folders no longer match transformers' ``checkpoint-N`` pattern,
    so ``resume_from_checkpoint=True`` and checkpoint rotation skip them. Returns ``(old, new)`` pairs.
    """
    moved = []
    for _, path in _checkpoint_folders(os.fspath(output_dir)):
        if is_complete_checkpoint(path):
            continue
        target, k = path + INCOMPLETE_SUFFIX, 1
        while os.path.exists(target):
            target, k = f"{path}{INCOMPLETE_SUFFIX}-{k}", k + 1
        os.rename(path, target)
        moved.append((path, target))
    return moved


def _unsupported_wrapper(trainer, args) -> str | None:
    """``"FSDP"``/``"DeepSpeed"`` if the run shards parameters (which the callback cannot resize), else None."""
    if trainer is not None:
        if getattr(trainer, "is_fsdp_enabled", False):
            return "FSDP"
        if getattr(trainer, "is_deepspeed_enabled", False):
            return "DeepSpeed"
    if args is not None:
        if getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None) is not None:
            return "DeepSpeed"
        if getattr(args, "fsdp", None):  # [] / "" / None when off
            return "FSDP"
    return None


# ``rediagonalize`` clamps |lambda| to 1 - 1e-6: a layer with a pole closer to the unit circle than that is
# numerically marginal (its Gramians are ~1 / (1 - |lambda|^2) and a pole at |lambda| = 1 - 1e-16 passes the
# strict ``|lambda| < 1`` check while dominating every Hankel singular value): skip it instead of cutting it
# down to that one mode.
MAX_POLE_MODULUS = 1.0 - 1e-6


def _check_pole_margin(system) -> None:
    from compressm_hf.errors import UnstableSystemError

    A = system.A
    if not torch.is_tensor(A) or A.numel() == 0:
        return
    if not bool(torch.isfinite(A).all()):
        return  # NaN/Inf: plan_reduction raises InvalidSystemError with the details
    modulus = (A if system.diagonal else torch.linalg.eigvals(A)).abs()
    worst = float(modulus.max())
    if worst > MAX_POLE_MODULUS:
        raise UnstableSystemError(
            f"|lambda| = {worst!r} is not <= {MAX_POLE_MODULUS!r}: the layer is (numerically) marginally "
            "stable or unstable and cannot be balanced reliably"
        )


def _set_statistics(model: torch.nn.Module, enabled: bool, reset: bool = False) -> None:
    """Switch surrogate-statistics collection of selective layers (those that have it) on or off."""
    for layer in find_reducible_layers(model):
        if hasattr(layer, "collect_statistics"):
            layer.collect_statistics = bool(enabled)
            if reset and callable(getattr(layer, "reset_statistics", None)):
                layer.reset_statistics()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_real(x) -> bool:
    """An int/float (NaN and Inf included), not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_report_name(name) -> str:
    """``name`` if it is a plain JSON file name (written inside ``output_dir``), else ValueError."""
    plain = (
        isinstance(name, str)
        and name.endswith(".json")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )
    if not plain:
        raise ValueError(
            "report_name must be a plain file name ending in .json (no folder, no '..', not absolute; it is "
            f"written inside output_dir and every checkpoint), got {name!r}"
        )
    return name


def _by_device(tensors):
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups.values()


def _nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an Inf (one host sync per device)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    index = {id(p): n for n, p in named}
    bad = []
    for group in _by_device([p for _, p in named]):
        flags = torch.stack([torch.isfinite(p.detach()).all() for p in group]).cpu().tolist()
        bad.extend(index[id(p)] for p, ok in zip(group, flags) if not ok)
    return bad


def _gradient_is_zero(model: torch.nn.Module) -> bool:
    """True if no trainable parameter has a gradient with a nonzero (or NaN) entry."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    for group in _by_device(grads):
        if bool(torch.stack([g.detach().ne(0).any() for g in group]).any()):
            return False
    return True


def _check_budget_args(tau, mode, target_total_state, target_mean_state, budget_schedule) -> bool:
    """Validate the state-budget arguments of :class:`CompreSSMCallback`; True if a budget is given."""
    if budget_schedule not in BUDGET_SCHEDULES:
        raise ValueError(f"budget_schedule must be one of {BUDGET_SCHEDULES}, got {budget_schedule!r}")
    if target_total_state is None and target_mean_state is None:
        return False
    if target_total_state is not None and target_mean_state is not None:
        raise ValueError(
            f"give one state budget, target_total_state ({target_total_state!r}) or target_mean_state "
            f"({target_mean_state!r}), not both"
        )
    if target_total_state is not None and (
        isinstance(target_total_state, bool)
        or not isinstance(target_total_state, int)
        or target_total_state < 1
    ):
        raise ValueError(
            f"target_total_state must be an int >= 1 (states summed over layers), got {target_total_state!r}"
        )
    if target_mean_state is not None and (not _is_number(target_mean_state) or target_mean_state < 1):
        raise ValueError(
            f"target_mean_state must be a finite number >= 1 (states per layer), got {target_mean_state!r}"
        )
    if tau is not None:
        raise ValueError(
            f"give either tau ({tau!r}) or a state budget (target_total_state / target_mean_state), not both: with a "
            "budget the callback finds the tau of every attempt itself"
        )
    if mode != "tolerance":
        raise ValueError(
            f"a state budget searches the tau of the tolerance rule and needs mode='tolerance', got mode={mode!r}"
        )
    return True


def _describe_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CompreSSMCallback(TrainerCallback, ExportableState):
    """Compress SSM layers while they train (CompreSSM, arXiv 2510.02823).

    Args:
        tau: discarded fraction of the Hankel-singular-value sum per layer, in ``[0, 1)``, for
            ``mode="tolerance"`` (ignored otherwise); default ``defaults.TAU`` (0.1, the largest value of
            the paper's grid {0.02, ..., 0.10, 0.15} short of the most aggressive one, and what
            ``compressm-train`` uses). Not with a state budget (``target_total_state`` / ``target_mean_state``).
        mode: ``"tolerance"`` (the paper's main method: smallest rank keeping ``(1 - tau)`` of
            ``sum(sigma)``), ``"fixed"`` (cut ``fixed_fraction`` of the states per attempt) or
            ``"pragmatic"`` (cut ``fixed_fraction`` per attempt; before each cut the model and
            optimizer are saved (CPU copies) with a fresh evaluation; at the next evaluation
            (or the next attempt) a metric drop larger than ``pragmatic_tolerance`` restores the
            pre-cut state exactly and stops cutting for good).
        schedule: a :class:`CompressionSchedule`, or a list of explicit optimizer steps.
        window: ``(start, end)`` fractions of ``max_steps`` (default ``(0.0, 0.1)``, the paper's: the
            learning-rate warm-up, after which 90% of training runs on the smaller model).
        attempts: equally spaced attempts inside the window (default 4, the paper's, so at 2.5%, 5%,
            7.5% and 10% of ``max_steps``). Every default comes from :mod:`compressm_hf.trainer.defaults`
            (shared with ``compressm-train`` and ``compressm-analyze``), which gives the paper's reasoning.
        steps: explicit optimizer steps (overrides ``window``/``attempts``).
        gate: a layer is cut only if the new rank is ``< gate * n`` (paper: 0.95).
        min_state_size: never shrink a layer below this many states.
        round_to: round every new size up to a multiple of this (kernel-friendly sizes).
        selection: ``"largest"`` (keep the dominant balanced states), ``"smallest"`` or
            ``"random"`` (paper App. C.1 ablations).
        fixed_fraction: fraction cut per attempt in ``"fixed"``/``"pragmatic"`` mode.
        optimizer_state: ``"slice"`` (carry Adam moments: by index when the layer reports the
            kept states, else the leading entries like the reference code) or ``"reset"``
            (fresh zero moments for the replaced tensors). The scalar ``step`` is always kept.
        pragmatic_tolerance: largest allowed drop of the metric (absolute) in pragmatic mode.
        metric_for_pragmatic: evaluation metric to compare (default
            ``args.metric_for_best_model``, else ``"eval_loss"``); the ``eval_`` prefix is optional.
        greater_is_better: direction of that metric (default: ``args.greater_is_better`` when
            the metric is ``args.metric_for_best_model``, else False for names ending in
            ``loss``/``perplexity``/``error``, True otherwise).
        seed: seeds ``selection="random"`` (per step and layer, so a resumed run draws the same).
        log_per_layer: also log per-layer sizes, energy kept and error bounds.
        statistics_steps: selective layers (Mamba) build their averaged LTI surrogate from
            running statistics of real training batches; they collect them during this many
            optimizer steps before every attempt (layers that have ``collect_statistics`` and
            ``reset_statistics()``). Statistics are reset after each attempt. A run too short for the
            schedule (attempts closer together than this, or merged by rounding) gets one
            :class:`~compressm_hf.trainer.schedule.ShortRunWarning` at ``on_train_begin`` naming what to
            change (more steps, a wider window, fewer attempts or fewer statistics steps).
        report_name: file name of the JSON report, written into ``output_dir`` and every checkpoint: a
            plain name ending in ``.json`` (no folder, no ``..``, not absolute; checked at construction).
        on_nonfinite: what to do when the training diverged or learned nothing (see below):
            ``"warn"`` (default: skip that attempt, warn loudly, go on training) or ``"stop"`` (skip the
            attempt and stop the training: ``control.should_training_stop = True``).
        skip_incomplete_checkpoints: when the Trainer is built (``on_init_end``), rename every
            ``checkpoint-N`` folder of ``output_dir`` that a killed process left half-written (no
            valid ``trainer_state.json`` or no weights) to ``checkpoint-N.incomplete``, so that
            ``train(resume_from_checkpoint=True)`` resumes from the last complete checkpoint instead of
            failing on (or silently half-loading) the broken one. Nothing is deleted.
        target_total_state: a global state budget instead of ``tau``: the total state size (summed over
            the reducible layers) the model should end at. At every attempt the callback finds the one
            ``tau`` shared by all layers (:func:`compressm_hf.budget.tau_for_budget`, exact bisection on
            the sigma-sum rule, respecting ``gate``, ``min_state_size`` and ``round_to``) that gives the
            largest total not above that attempt's target, and records it in the report (``"budget"`` of the
            event). The final attempt aims at the budget itself. Needs ``mode="tolerance"`` and no ``tau``;
            a budget below what ``min_state_size``/``round_to``/``gate`` allow raises at ``on_train_begin``.
        target_mean_state: the same as a mean per layer: the budget is ``floor(mean * num_layers)``.
            Exclusive with ``target_total_state``.
        budget_schedule: how the budget applies across attempts: ``"geometric"`` (default: attempt ``k``
            of ``K`` aims at ``N0 * (budget / N0) ** (k / K)``, ``N0`` the original total, so each attempt
            removes about the same fraction and the model recovers between cuts, like the paper's repeated
            cuts) or ``"direct"`` (every attempt aims at the budget).

    Supported distribution: single process and DDP (``torchrun`` / ``accelerate launch --multi_gpu``,
    including gloo on CPU): rank 0 plans, every rank applies the same cut, DDP is rebuilt in place.
    Pass ``TrainingArguments(ddp_find_unused_parameters=False)`` when every parameter gets a gradient (true of
    the LRU and Mamba models here, which ``compressm-train`` sets): transformers' default (True) makes DDP
    search for unused parameters every step and warn about it on every rank.
    FSDP and DeepSpeed shard or flatten parameters and cannot be resized by a callback: they are
    refused (``ValueError`` when the Trainer is built and at ``on_train_begin``).

    A layer whose system cannot be reduced at an attempt (NaN/Inf parameters, unstable dynamics,
    missing statistics: any ``ValueError`` from ``lti_system()`` or the planner) is skipped with a
    warning and a ``"skipped"`` entry in the report; the model is left untouched and training goes on.

    Non-finite or signal-free training is never compressed. Before planning at every attempt (and again
    at ``on_train_end``) the callback checks the run's health; a problem skips the whole attempt (no layer
    is cut, the event gets ``"skipped": reason`` and every layer ``"reason": "skipped: ..."``), raises a
    :class:`NonFiniteTrainingWarning` (also logged as an error), is recorded in the report's ``"health"``
    list and, with ``on_nonfinite="stop"``, stops the training (``"training_stopped"`` in the report).
    The problems, each sound evidence that the model is diverging or learns nothing:

    * a trainable parameter holds a NaN or an Inf (the Trainer's ``logging_nan_inf_filter``, on by
      default, hides a NaN loss from the logged ``loss``/``train_loss``, but not from the weights);
    * a training loss logged since the previous check is NaN/Inf (``logging_nan_inf_filter=False``);
    * the gradient of the attempt's optimizer step (seen at ``on_pre_optimizer_step``) is exactly zero in
      every trainable parameter: the loss gives no training signal, e.g. a causal LM fed sequences of
      length 1, whose labels are all ignored (weight decay still moves the weights, so "the weights did
      not change" would not catch it);
    * every training loss logged since the previous check is exactly 0.0 (attempts only).

    Only the parameters are checked at ``on_train_end``. The callback's own files (report, pragmatic
    snapshot) are written through a temporary file and ``os.replace``; a failed write (e.g. a full disk)
    raises :class:`~compressm_hf.trainer.report.ReportWriteError` naming the file, except right after a cut
    (the report is rewritten at the next save), where it is a warning.

    Raises:
        ValueError: at construction for bad arguments; at ``on_train_begin`` for a schedule
            that does not fit the run, a model without reducible layers, or pragmatic mode
            without evaluation.
    """

    def __init__(
        self,
        tau: float | None = None,
        mode: str = defaults.MODE,
        *,
        schedule: CompressionSchedule | Sequence[int] | None = None,
        window: Sequence[float] | None = None,
        attempts: int | None = None,
        steps: Sequence[int] | None = None,
        gate: float = defaults.GATE,
        min_state_size: int = defaults.MIN_STATE_SIZE,
        round_to: int = defaults.ROUND_TO,
        selection: str = defaults.SELECTION,
        fixed_fraction: float = defaults.FIXED_FRACTION,
        optimizer_state: str = defaults.OPTIMIZER_STATE,
        pragmatic_tolerance: float = defaults.PRAGMATIC_TOLERANCE,
        metric_for_pragmatic: str | None = None,
        greater_is_better: bool | None = None,
        seed: int = 0,
        log_per_layer: bool = True,
        statistics_steps: int = defaults.STATISTICS_STEPS,
        report_name: str = REPORT_NAME,
        skip_incomplete_checkpoints: bool = True,
        on_nonfinite: str = "warn",
        target_total_state: int | None = None,
        target_mean_state: float | None = None,
        budget_schedule: str = "geometric",
    ) -> None:
        if (
            isinstance(statistics_steps, bool)
            or not isinstance(statistics_steps, int)
            or statistics_steps < 1
        ):
            raise ValueError(f"statistics_steps must be an int >= 1, got {statistics_steps!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(
                f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}"
            )
        budget_given = _check_budget_args(tau, mode, target_total_state, target_mean_state, budget_schedule)
        if mode == "tolerance" and not budget_given:
            if tau is None:  # CompreSSMCallback(): the one default, shared with compressm-train
                tau = defaults.TAU
            if not _is_number(tau) or not 0.0 <= float(tau) < 1.0:
                raise ValueError(
                    f"tau must be a number in [0, 1) (discarded fraction of sum(HSV)), got {tau!r}"
                )
        elif tau is not None and (not _is_number(tau) or not 0.0 <= float(tau) < 1.0):
            raise ValueError(f"tau must be a number in [0, 1) or None, got {tau!r}")
        if not _is_number(pragmatic_tolerance) or pragmatic_tolerance < 0:
            raise ValueError(f"pragmatic_tolerance must be a number >= 0, got {pragmatic_tolerance!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if metric_for_pragmatic is not None and not isinstance(metric_for_pragmatic, str):
            raise ValueError(f"metric_for_pragmatic must be a metric name, got {metric_for_pragmatic!r}")
        if not isinstance(on_nonfinite, str) or on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        _check_report_name(report_name)
        self.schedule = CompressionSchedule.coerce(schedule, window=window, attempts=attempts, steps=steps)
        self.tau = None if tau is None else float(tau)
        self.mode = mode
        try:
            self.policy = RankPolicy(
                tau=self.tau if mode == "tolerance" and self.tau is not None else 0.0,  # budget: per attempt
                mode="tolerance" if mode == "tolerance" else "fixed",
                gate=gate,
                min_rank=min_state_size,
                multiple_of=round_to,
                selection=selection,
                fixed_fraction=fixed_fraction,
            )
        except ValueError as exc:  # CompreSSMError subclasses ValueError; rename the fields for users
            msg = str(exc).replace("min_rank", "min_state_size").replace("multiple_of", "round_to")
            raise ValueError(msg) from None
        self.gate = float(gate)
        self.min_state_size = int(min_state_size)
        self.round_to = int(round_to)
        self.selection = selection
        self.fixed_fraction = float(fixed_fraction)
        self.optimizer_state = optimizer_state
        self.pragmatic_tolerance = float(pragmatic_tolerance)
        self.metric_for_pragmatic = metric_for_pragmatic
        self.greater_is_better = greater_is_better
        self.seed = seed
        self.log_per_layer = bool(log_per_layer)
        self.statistics_steps = statistics_steps
        self.report_name = report_name
        self.skip_incomplete_checkpoints = bool(skip_incomplete_checkpoints)
        self.on_nonfinite = on_nonfinite
        self.target_total_state = None if target_total_state is None else int(target_total_state)
        self.target_mean_state = None if target_mean_state is None else float(target_mean_state)
        self.budget_schedule = budget_schedule

        # --- exported state (survives checkpoints; see state()) ---
        self.history: list[dict] = []  # report events
        self.done_steps: list[int] = []  # scheduled steps already handled
        self.stopped: bool = False  # pragmatic: cutting stopped after a rollback
        self.original_sizes: list[int] | None = None
        self.pending: dict | None = None  # pragmatic: {"step", "metric_before", "sizes_before"}
        self.health: list[dict] = []  # non-finite / no-signal training noticed ({"step", "at", ...})
        self.training_stopped: str | None = None  # on_nonfinite="stop": why the training was stopped

        # --- runtime only ---
        self._trainer = None
        self._bound = False
        self._steps: list[int] = []
        self._snapshot: dict | None = None
        self._metric: str | None = None
        self._greater: bool = True
        self._in_precut_eval = False
        self._precut_metrics: dict | None = None
        self._unlogged: list[dict] = []
        self._zero_gradient_at: dict[int, bool] = {}  # attempt step -> its gradient was all zero
        self._checked_step = 0  # losses logged after this step are looked at by the next health check
        self._warned_layers: set[tuple[str, int]] = set()  # (argument, layer_idx) warned about
        self._budget_total: int | None = None  # the state budget as a total (set at on_train_begin)

    # ------------------------------------------------------------------ public helpers

    def bind(self, trainer) -> CompreSSMCallback:
        """Use ``trainer`` (instead of finding it on the call stack at ``on_train_begin``)."""
        self._trainer = trainer
        self._bound = trainer is not None
        return self

    @property
    def trainer(self):
        return self._trainer

    @property
    def schedule_steps(self) -> list[int]:
        """The resolved attempt steps (empty before ``on_train_begin``)."""
        return list(self._steps)

    def config_dict(self) -> dict:
        """The callback's settings (JSON-friendly; stored in the report)."""
        return {
            "tau": self.tau,
            "mode": self.mode,
            "schedule": self.schedule.to_dict(),
            "gate": self.gate,
            "min_state_size": self.min_state_size,
            "round_to": self.round_to,
            "selection": self.selection,
            "fixed_fraction": self.fixed_fraction,
            "optimizer_state": self.optimizer_state,
            "pragmatic_tolerance": self.pragmatic_tolerance,
            "metric_for_pragmatic": self._metric or self.metric_for_pragmatic,
            "greater_is_better": self._greater if self._metric else self.greater_is_better,
            "seed": self.seed,
            "statistics_steps": self.statistics_steps,
            "on_nonfinite": self.on_nonfinite,
            "target_total_state": self.target_total_state,
            "target_mean_state": self.target_mean_state,
            "budget_schedule": self.budget_schedule,
            "budget_total": self._budget_total,
        }

    def report(self, model: torch.nn.Module | None = None) -> dict:
        """The current ``compression_report.json`` content."""
        final = None
        if model is not None:
            final = [int(layer.state_size) for layer in find_reducible_layers(model)]
        elif self.history:
            final = list(self.history[-1]["sizes_after"])
        elif self.original_sizes is not None:
            final = list(self.original_sizes)
        return build_report(
            config=self.config_dict(),
            schedule_steps=self._steps,
            original_sizes=self.original_sizes,
            final_sizes=final,
            events=self.history,
            stopped=self.stopped,
            health=self.health,
            training_stopped=self.training_stopped,
        )

    # ------------------------------------------------------------------ ExportableState

    def state(self) -> dict:
        """Exported into ``TrainerState.stateful_callbacks`` at every checkpoint.

        ``args`` rebuild an equivalent callback (``type(cb)(**args)``, as
        ``Trainer._load_callback_state`` does with ``restore_callback_states_from_checkpoint``),
        ``attributes`` carry the history. Without that flag the callback restores itself from
        the same entry at ``on_train_begin`` of a resumed run.
        """
        sched = self.schedule.to_dict()
        return {
            "args": {
                "tau": self.tau,
                "mode": self.mode,
                "window": sched.get("window"),
                "attempts": sched.get("attempts"),
                "steps": sched.get("steps"),
                "gate": self.gate,
                "min_state_size": self.min_state_size,
                "round_to": self.round_to,
                "selection": self.selection,
                "fixed_fraction": self.fixed_fraction,
                "optimizer_state": self.optimizer_state,
                "pragmatic_tolerance": self.pragmatic_tolerance,
                "metric_for_pragmatic": self.metric_for_pragmatic,
                "greater_is_better": self.greater_is_better,
                "seed": self.seed,
                "log_per_layer": self.log_per_layer,
                "statistics_steps": self.statistics_steps,
                "report_name": self.report_name,
                "skip_incomplete_checkpoints": self.skip_incomplete_checkpoints,
                "on_nonfinite": self.on_nonfinite,
                "target_total_state": self.target_total_state,
                "target_mean_state": self.target_mean_state,
                "budget_schedule": self.budget_schedule,
            },
            "attributes": jsonable(
                {
                    "history": self.history,
                    "done_steps": self.done_steps,
                    "stopped": self.stopped,
                    "original_sizes": self.original_sizes,
                    "pending": self.pending,
                    "health": self.health,
                    "training_stopped": self.training_stopped,
                }
            ),
        }

    def _restore_attributes(self, attributes: dict) -> None:
        self.history = list(attributes.get("history") or [])
        self.done_steps = [int(s) for s in attributes.get("done_steps") or []]
        self.stopped = bool(attributes.get("stopped", False))
        sizes = attributes.get("original_sizes")
        self.original_sizes = None if sizes is None else [int(n) for n in sizes]
        self.pending = attributes.get("pending")
        self.health = list(attributes.get("health") or [])
        self.training_stopped = attributes.get("training_stopped")

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, **kwargs):
        trainer = self._trainer if self._bound else find_trainer()
        self._refuse_unsupported_wrapper(trainer, args)
        protect_hub_token(args)  # before the Trainer pickles args into any training_args.bin
        # transformers drops ddp_timeout on CPU (gloo): make it bound every collective, DDP's own included
        apply_ddp_timeout(getattr(args, "ddp_timeout", None))
        if self.skip_incomplete_checkpoints and args.output_dir:
            if args.should_save:
                for old, new in quarantine_incomplete_checkpoints(args.output_dir):
                    warnings.warn(
                        f"{old} is an incomplete checkpoint (the process writing it was killed): renamed to {new} "
                        "so that resume_from_checkpoint=True uses the last complete one "
                        f"({last_complete_checkpoint(args.output_dir)})",
                        stacklevel=2,
                    )
            if is_distributed():  # every rank must see the same checkpoint list before train()
                distributed_barrier("the checkpoint-list barrier of on_init_end")
        return control

    def _refuse_unsupported_wrapper(self, trainer, args) -> None:
        kind = _unsupported_wrapper(trainer, args)
        if kind is None:
            return
        raise ValueError(
            f"CompreSSMCallback cannot run under {kind}: {kind} shards/flattens the parameters and owns the "
            "optimizer state, so the layers cannot change their state size in the middle of training. Instead: "
            "(1) run the compression phase (the schedule window, by default the first 10% of the steps) with "
            "DDP (torchrun --nproc_per_node N, or accelerate launch --multi_gpu) or a single process, saving a "
            "checkpoint after the last cut; (2) continue with "
            f"{kind}: Model.from_pretrained(checkpoint) builds the compressed shapes "
            "(config.state_sizes), then train it without CompreSSMCallback."
        )

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        apply_ddp_timeout(getattr(args, "ddp_timeout", None))  # a no-op unless added after on_init_end
        if not self._bound:
            self._trainer = find_trainer()
        self._refuse_unsupported_wrapper(self._trainer, args)
        if model is None:
            raise ValueError("CompreSSMCallback needs the model (the Trainer passes it to every event)")
        layers = find_reducible_layers(model)
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no reducible SSM layer (no module implements lti_system(), reduce_() "
                "and layer_idx); CompreSSMCallback has nothing to compress"
            )
        enable_compressed_adapter_saving(model)  # peft: adapters carry the reduced base tensors
        self._steps = self.schedule.resolve(state.max_steps)
        if state.is_world_process_zero and any(t > state.global_step for t in self._steps):
            advice = self.schedule.short_run_advice(
                state.max_steps,
                self.statistics_steps,
                needs_statistics=any(hasattr(m, "collect_statistics") for m in layers),
            )
            if advice is not None:
                warnings.warn(advice, ShortRunWarning, stacklevel=2)
        if self.mode == "pragmatic":
            self._check_pragmatic(args)

        resumed = state.global_step > 0
        if resumed:
            data = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(data, list):
                data = data[0] if data else None
            if isinstance(data, dict) and "attributes" in data:
                self._restore_attributes(data["attributes"])
            elif not self.history:
                warnings.warn(
                    "resuming without a saved CompreSSMCallback state: the compression history starts empty; "
                    f"attempts at steps <= {state.global_step} are skipped",
                    stacklevel=2,
                )
        else:
            self.history, self.done_steps, self.stopped, self.pending = [], [], False, None
            self.original_sizes = None
            self.health, self.training_stopped = [], None
        self._snapshot = None
        self._zero_gradient_at = {}
        self._checked_step = int(state.global_step)
        sizes = [int(layer.state_size) for layer in layers]
        self._warn_uncuttable_layers(layers)
        if self.original_sizes is None:
            self.original_sizes = sizes
        self._resolve_budget(sizes)
        if self.history and list(self.history[-1]["sizes_after"]) != sizes:
            warnings.warn(
                f"the model's state sizes {sizes} differ from the last recorded compression event "
                f"({self.history[-1]['sizes_after']}); was the checkpoint loaded into the model?",
                stacklevel=2,
            )
        if self.pending is not None:
            self._load_pending_snapshot(args, state)
        self._sync_config(model, layers)
        # Transformers only registers stateful callbacks present when TrainerState was created; a run
        # resumed from a checkpoint written without this callback would KeyError at the next save.
        if state.stateful_callbacks is not None and type(self).__name__ not in state.stateful_callbacks:
            state.stateful_callbacks[type(self).__name__] = self.state()
        logger.info(
            "CompreSSM: mode=%s tau=%s attempts at steps %s (max_steps=%s); layers %s sizes %s",
            self.mode,
            self.tau,
            self._steps,
            state.max_steps,
            [int(layer.layer_idx) for layer in layers],
            sizes,
        )
        return control

    def _resolve_budget(self, sizes: list[int]) -> None:
        """``self._budget_total`` from the budget arguments; raise if the policy cannot reach it (on_train_begin)."""
        self._budget_total = None
        if self.target_total_state is None and self.target_mean_state is None:
            return
        if self.target_total_state is not None:
            total = self.target_total_state
        else:
            total = budget_from_mean(self.target_mean_state, len(sizes))
        floor = minimum_total(sizes, self.policy)
        if total < floor:
            asked = (
                f"target_total_state={total}"
                if self.target_total_state is not None
                else f"target_mean_state={self.target_mean_state} (a total of {total} over {len(sizes)} layers)"
            )
            raise ValueError(
                f"the state budget {asked} is unreachable: with min_state_size={self.min_state_size}, "
                f"round_to={self.round_to} and gate={self.gate}, the {len(sizes)} layers of sizes {sizes} cannot go "
                f"below a total of {floor}; raise the budget or lower min_state_size / round_to"
            )
        original = list(self.original_sizes or sizes)
        if total >= sum(original):
            warnings.warn(
                f"CompreSSM: the state budget {total} is not below the model's total state size {sum(original)} "
                f"(sizes {original}): nothing will be cut",
                stacklevel=3,
            )
        self._budget_total = total

    def _warn_uncuttable_layers(self, layers) -> None:
        """Warn (once per layer and argument) when ``min_state_size``/``round_to`` forbid every cut of a layer."""
        for name, value in (("min_state_size", self.min_state_size), ("round_to", self.round_to)):
            if value <= 1:
                continue
            for layer in layers:
                n, idx = int(layer.state_size), int(layer.layer_idx)
                if value < n or (name, idx) in self._warned_layers:
                    continue
                self._warned_layers.add((name, idx))
                rule = (
                    "no layer is shrunk below it"
                    if name == "min_state_size"
                    else "new sizes are rounded up to a multiple of it, capped at the state size"
                )
                warnings.warn(
                    f"CompreSSM: {name}={value} is not below layer {idx}'s state size {n} "
                    f"({type(layer).__name__}): {rule}, so this layer can never be cut",
                    stacklevel=3,
                )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # The optimizer step about to run ends with global_step == state.global_step + 1.
        upcoming = [t for t in self._steps if t not in self.done_steps and t > state.global_step]
        collect = (
            bool(upcoming) and not self.stopped and upcoming[0] - state.global_step <= self.statistics_steps
        )
        if model is not None:
            _set_statistics(model, collect)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The gradient of an attempt's optimizer step (zeroed before on_step_end): all zero = no signal.
        upcoming = int(state.global_step) + 1
        if model is not None and upcoming in self._steps and upcoming not in self.done_steps:
            self._zero_gradient_at[upcoming] = _gradient_is_zero(model)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        if step not in self._steps or step in self.done_steps:
            return control
        self.done_steps.append(step)
        # Trainer.log (our metrics, the pragmatic pre-cut evaluation) ends in on_log, which clears
        # control.should_log: the Trainer would then drop the training-loss entry of this step.
        log_requested = bool(control.should_log)
        self._attempt(args, state, control, model, optimizer)
        control.should_log = bool(control.should_log) or log_requested
        return control

    def _attempt(self, args, state, control, model, optimizer) -> None:
        """One scheduled attempt (after the health check): evaluate/compare/cut (pragmatic) or cut."""
        step = int(state.global_step)
        if self.stopped:
            return
        problems = self._health_problems(model, state, at_attempt=True)
        if problems:
            self._skip_attempt(args, state, control, model, problems)
            return
        if self.mode == "pragmatic":
            metrics = self._evaluate_now()
            value = self._metric_value(metrics)
            if self.pending is not None and self._compare_and_maybe_rollback(
                args, state, model, optimizer, value, step
            ):
                return
            self._snapshot = snapshot_training_state(model, optimizer, find_reducible_layers(model))
            event = self._reduce(args, state, model, optimizer)
            if event["layers_reduced"]:
                self.pending = {
                    "step": step,
                    "metric_before": value,
                    "sizes_before": list(event["sizes_before"]),
                }
            else:
                self._snapshot = None
        else:
            self._reduce(args, state, model, optimizer)

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self._in_precut_eval:
            self._precut_metrics = dict(metrics or {})
            return control
        if self.mode != "pragmatic" or self.pending is None or self.stopped:
            return control
        if state.global_step <= int(self.pending["step"]):
            return control  # the evaluation right after a cut: no training since, compare later
        self._compare_and_maybe_rollback(args, state, model, optimizer, self._metric_value(metrics), None)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Fallback when no Trainer was found: metrics were appended to state.log_history directly;
        # also hand them to the loggers that come after this callback.
        if self._unlogged and logs is not None:
            for payload in self._unlogged:
                logs.update(payload)
            self._unlogged = []
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return control
        if state.is_world_process_zero:
            write_report(os.path.join(checkpoint, self.report_name), self.report(kwargs.get("model")))
            if self.pending is not None and self._snapshot is not None:
                save_torch_atomic(self._snapshot, os.path.join(checkpoint, SNAPSHOT_NAME))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.mode == "pragmatic" and self.pending is not None:
            logger.warning(
                "CompreSSM pragmatic: training ended before an evaluation judged the cut at step %s; it is kept",
                self.pending["step"],
            )
        if model is not None:
            problems = self._health_problems(model, state, at_attempt=False)
            if problems:
                self._record_health(state, "train_end", "warned", problems)
        if state.is_world_process_zero and args.output_dir:
            write_report(os.path.join(args.output_dir, self.report_name), self.report(model))
        return control

    # ------------------------------------------------------------------ health (non-finite / no signal)

    def _health_problems(self, model, state, at_attempt: bool) -> list[str]:
        """What says that the training diverged or learns nothing (see the class docstring); [] if healthy.

        Looks at the trainable parameters, the training losses logged since the previous check and, at an
        attempt, the gradient of the attempt's step. Rank 0 decides for every rank.
        """
        step = int(state.global_step)
        problems = []
        bad = _nonfinite_parameters(model)
        if bad:
            problems.append(
                f"non-finite values (NaN/Inf) in {len(bad)} trainable parameter(s): {_describe_names(bad)}"
            )
        losses = [
            (int(h.get("step", step)), float(h["loss"]))
            for h in state.log_history
            if _is_real(h.get("loss")) and int(h.get("step", step)) > self._checked_step
        ]
        nonfinite = [s for s, v in losses if not math.isfinite(v)]
        if nonfinite:
            problems.append(
                f"non-finite training loss logged at step(s) {_describe_names([str(s) for s in nonfinite])}"
            )
        if at_attempt:
            if self._zero_gradient_at.pop(step, False):
                problems.append(
                    "the gradient is exactly zero in every trainable parameter: the loss gives no training "
                    "signal (no targets? e.g. a causal LM fed sequences of length 1 has all labels ignored)"
                )
            if losses and all(v == 0.0 for _, v in losses):
                problems.append(
                    f"the training loss is exactly 0 at every step logged since step {self._checked_step} "
                    f"({len(losses)} entries)"
                )
        self._checked_step = step
        if is_distributed():
            (problems,) = broadcast_objects([problems], what=f"the health check of step {step}")
        return problems

    def _record_health(self, state, at: str, action: str, problems: list[str]) -> None:
        """Record a health problem in the report and warn loudly (warning + error log)."""
        step = int(state.global_step)
        self.health.append({"step": step, "at": at, "action": action, "problems": list(problems)})
        reason = "; ".join(problems)
        if at == "train_end":
            message = (
                f"CompreSSM at the end of training (step {step}): {reason}. The trained model is broken "
                "(it diverged or learned nothing); check the data for NaN/Inf features, the learning rate and "
                "the labels"
            )
        else:
            what = (
                "stopping the training (on_nonfinite='stop')"
                if action == "stopped"
                else "training goes on (on_nonfinite='warn'); later attempts check again"
            )
            message = (
                f"CompreSSM step {step}: {reason}. The model was not compressed at this attempt (it diverged or "
                f"learned nothing); {what}. Check the data for NaN/Inf features, the learning rate and the labels"
            )
        logger.error(message)
        warnings.warn(message, NonFiniteTrainingWarning, stacklevel=3)

    def _skip_attempt(self, args, state, control, model, problems: list[str]) -> None:
        """An attempt on a broken run: no cut; a ``"skipped"`` event, a health record, maybe stop training."""
        step = int(state.global_step)
        layers = find_reducible_layers(model)
        sizes = [int(layer.state_size) for layer in layers]
        reason = "; ".join(problems)
        stop = self.on_nonfinite == "stop"
        _set_statistics(model, False, reset=True)
        event = {
            "kind": "reduction",
            "step": step,
            "epoch": state.epoch,
            "skipped": reason,
            "sizes_before": sizes,
            "sizes_after": sizes,
            "layers_reduced": 0,
            "optimizer_state": self.optimizer_state,
            "optimizer_counts": {},
            "wall_time_s": 0.0,
            "layers": [
                {
                    "layer_idx": int(layer.layer_idx),
                    "n_before": n,
                    "n_after": n,
                    "reduced": False,
                    "reason": f"skipped: {reason}",
                }
                for layer, n in zip(layers, sizes)
            ],
        }
        self.history.append(jsonable(event))
        if stop:
            control.should_training_stop = True
            self.training_stopped = f"step {step}: {reason}"
        self._record_health(state, "attempt", "stopped" if stop else "skipped", problems)
        self._sync_config(model, layers)
        self._emit(args, state, event)

    # ------------------------------------------------------------------ the reduction

    def _event_generator(self, step: int, layer_idx: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + step * 8191 + layer_idx) % (2**63 - 1))
        return g

    @torch.no_grad()
    def _reduce(self, args, state, model, optimizer) -> dict:
        step = int(state.global_step)
        t_event, cpu_event = time.perf_counter(), time.process_time()
        layers = find_reducible_layers(model)
        sizes_before = [int(layer.state_size) for layer in layers]
        if distributed_rank() == 0:
            plans, times, skipped, budget = self._plan_layers(step, layers)
        else:
            plans, times, skipped, budget = [None] * len(layers), [0.0] * len(layers), {}, None
        if is_distributed():
            plans, times, skipped, budget = broadcast_objects(
                [plans, times, skipped, budget], what=f"the compression plan of step {step}"
            )
        _set_statistics(model, False, reset=True)

        swaps = []
        records = []
        for layer, plan, dt in zip(layers, plans, times):
            n = int(layer.state_size)
            record = {"layer_idx": int(layer.layer_idx), "n_before": n, "n_after": n, "reduced": False}
            if plan is None:
                idx = int(layer.layer_idx)
                within = budget is not None and budget.get("within_budget")
                record["reason"] = (
                    f"skipped: {skipped[idx]}" if idx in skipped else ("budget met" if within else "gate")
                )
            else:
                t0 = time.perf_counter()
                layer_swaps = list(layer.reduce_(plan))
                for swap in layer_swaps:  # a frozen parameter stays frozen (e.g. under peft)
                    old, new = (swap.old, swap.new) if hasattr(swap, "old") else (swap[0], swap[1])
                    if new.requires_grad != old.requires_grad:
                        new.requires_grad_(old.requires_grad)
                swaps.extend(layer_swaps)
                dt += time.perf_counter() - t0
                record.update(plan_record(plan, layer.state_size))
                if int(layer.state_size) != int(plan.rank):
                    raise RuntimeError(
                        f"{type(layer).__name__} (layer {layer.layer_idx}) reduce_ left {layer.state_size} states, "
                        f"the plan asked for {plan.rank}"
                    )
            record["wall_time_s"] = dt
            records.append(record)

        counts = {}
        if swaps:
            if optimizer is not None:
                counts = transplant_optimizer_state(optimizer, swaps, self.optimizer_state)
            wrapped = getattr(self._trainer, "model_wrapped", None)
            if wrapped is not None and wrapped is not model:
                rebuild_ddp_in_place_(wrapped)
            elif is_distributed():
                warnings.warn(
                    "torch.distributed is initialized but the Trainer was not found: DDP was not rebuilt after "
                    "the cut and ranks may silently diverge; call CompreSSMCallback.bind(trainer)",
                    stacklevel=2,
                )
        sizes_after = [int(layer.state_size) for layer in layers]
        event = {
            "kind": "reduction",
            "step": step,
            "epoch": state.epoch,
            "sizes_before": sizes_before,
            "sizes_after": sizes_after,
            "layers_reduced": sum(1 for r in records if r["reduced"]),
            "optimizer_state": self.optimizer_state,
            "optimizer_counts": counts,
            "wall_time_s": time.perf_counter() - t_event,
            "cpu_time_s": time.process_time() - cpu_event,  # process CPU time, all threads
            "layers": records,
        }
        if budget is not None:
            event["budget"] = budget
        self.history.append(jsonable(event))
        self._sync_config(model, layers)
        self._emit(args, state, event)
        logger.info("CompreSSM step %d: state sizes %s -> %s", step, sizes_before, sizes_after)
        return event

    def _plan_layers(self, step: int, layers) -> tuple[list, list[float], dict[int, str], dict | None]:
        """Rank 0's plans of one attempt: ``(plans, seconds per layer, {layer_idx: why skipped}, budget record)``.

        Without a budget every layer is planned with ``self.policy``. With one, every layer's rank scores
        are computed first, :func:`~compressm_hf.budget.tau_for_budget` finds the attempt's shared ``tau``
        for this attempt's target (:func:`~compressm_hf.budget.attempt_targets`; layers skipped here keep
        their size and count against it), and every layer is planned with that ``tau``. A layer whose
        system cannot be reduced (any ``ValueError``: NaN/Inf, unstable, missing statistics) is skipped.
        """
        times = [0.0] * len(layers)
        skipped: dict[int, str] = {}
        systems: dict[int, tuple] = {}  # position -> (system, rank scores or None)
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            try:
                system = layer.lti_system()
                _check_pole_margin(system)
                systems[i] = (system, rank_scores(system) if self._budget_total is not None else None)
            except ValueError as exc:  # NaN/Inf, unstable dynamics, missing statistics ...
                self._skip_layer(step, layer, exc, skipped)
            times[i] += time.perf_counter() - t0
        policy, budget = self.policy, None
        if self._budget_total is not None:
            policy, budget = self._budget_policy(step, layers, systems)
        plans: list = [None] * len(layers)
        for i, layer in enumerate(layers):
            if i not in systems or (budget is not None and budget["within_budget"]):
                continue
            t0 = time.perf_counter()
            try:
                plans[i] = plan_reduction(systems[i][0], policy, self._event_generator(step, layer.layer_idx))
            except ValueError as exc:
                self._skip_layer(step, layer, exc, skipped)
            times[i] += time.perf_counter() - t0
        return plans, times, skipped, budget

    @staticmethod
    def _skip_layer(step: int, layer, exc: ValueError, skipped: dict[int, str]) -> None:
        skipped[int(layer.layer_idx)] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"CompreSSM step {step}: layer {layer.layer_idx} skipped, its system cannot be reduced "
            f"({type(exc).__name__}: {exc}); the layer is left unchanged",
            stacklevel=3,
        )

    def _budget_policy(self, step: int, layers, systems: dict[int, tuple]) -> tuple[RankPolicy, dict]:
        """The policy of this attempt under the state budget, and the report's ``"budget"`` record."""
        attempt = self._steps.index(step) + 1 if step in self._steps else len(self._steps)
        attempts = max(1, len(self._steps))
        original = sum(self.original_sizes or [int(layer.state_size) for layer in layers])
        target = attempt_targets(original, self._budget_total, attempts, self.budget_schedule)[attempt - 1]
        current = sum(int(layer.state_size) for layer in layers)
        fixed = sum(int(layer.state_size) for i, layer in enumerate(layers) if i not in systems)
        record = {
            "target_total_state": self._budget_total,
            "schedule": self.budget_schedule,
            "attempt": attempt,
            "attempts": attempts,
            "attempt_target": target,
            "total_before": current,
            "within_budget": current <= target or not systems,
            "tau": None,
        }
        if record["within_budget"]:
            return self.policy, record
        solution = tau_for_budget(
            [systems[i][1] for i in sorted(systems)],
            max(1, target - fixed),
            self.policy,
            on_unreachable="closest",
        )
        record.update(
            tau=solution.tau,
            tau_interval=list(solution.tau_interval),
            planned_total=solution.total + fixed,
            met=solution.total + fixed <= target,
        )
        if not record["met"]:
            warnings.warn(
                f"CompreSSM step {step}: attempt {attempt}/{attempts} aims at a total state size of {target} but "
                f"can reach only {record['planned_total']} (min_state_size={self.min_state_size}, round_to="
                f"{self.round_to}, gate={self.gate}, {len(layers) - len(systems)} layer(s) skipped); cutting as far "
                "as allowed",
                stacklevel=3,
            )
        return dataclasses.replace(self.policy, tau=solution.tau), record

    def _sync_config(self, model, layers) -> None:
        config = getattr(model, "config", None)
        if config is None:
            return
        sizes = getattr(config, "state_sizes", None)
        if sizes is not None:
            sizes = list(sizes)
            for layer in layers:
                idx = int(layer.layer_idx)
                if idx < len(sizes) and int(sizes[idx]) != int(layer.state_size):
                    warnings.warn(
                        f"{type(layer).__name__} (layer {idx}) did not update config.state_sizes[{idx}] "
                        f"({sizes[idx]} != {layer.state_size}); fixed by CompreSSMCallback",
                        stacklevel=3,
                    )
                    sizes[idx] = int(layer.state_size)
            config.state_sizes = sizes
        config.compression = config_record(
            tau=self.tau,
            mode=self.mode,
            original_sizes=self.original_sizes,
            events=self.history,
            target_total_state=self._budget_total,
        )

    def _emit(self, args, state, event: dict) -> None:
        payload = event_log_payload(event, per_layer=self.log_per_layer)
        if state.is_world_process_zero and args.output_dir:
            try:
                write_report(os.path.join(args.output_dir, self.report_name), self.report())
            except OSError as exc:  # never kill a run over the report
                logger.warning("could not write the compression report: %s", exc)
        if self._trainer is not None and callable(getattr(self._trainer, "log", None)):
            self._trainer.log(dict(payload))
        else:
            state.log_history.append({**payload, "step": state.global_step})
            self._unlogged.append(payload)

    # ------------------------------------------------------------------ pragmatic mode

    def _check_pragmatic(self, args) -> None:
        strategy = getattr(args, "eval_strategy", None)
        if strategy is None or str(getattr(strategy, "value", strategy)) == "no":
            raise ValueError(
                "mode='pragmatic' compares an evaluation metric before and after each cut: set "
                "TrainingArguments(eval_strategy='steps', eval_steps=...) and pass an eval_dataset"
            )
        if self._trainer is None or not callable(getattr(self._trainer, "evaluate", None)):
            raise ValueError(
                "mode='pragmatic' evaluates before each cut and needs the Trainer, which was not found on the "
                "call stack; call CompreSSMCallback.bind(trainer)"
            )
        if getattr(self._trainer, "eval_dataset", None) is None:
            raise ValueError("mode='pragmatic' needs an eval_dataset on the Trainer")
        metric = self.metric_for_pragmatic or args.metric_for_best_model or "eval_loss"
        if not metric.startswith("eval_"):
            metric = f"eval_{metric}"
        self._metric = metric
        if self.greater_is_better is not None:
            self._greater = bool(self.greater_is_better)
        else:
            best = args.metric_for_best_model
            best = None if best is None else (best if best.startswith("eval_") else f"eval_{best}")
            if best == metric and args.greater_is_better is not None:
                self._greater = bool(args.greater_is_better)
            else:
                self._greater = not metric.endswith(("loss", "perplexity", "error"))

    def _evaluate_now(self) -> dict:
        self._in_precut_eval = True
        self._precut_metrics = None
        try:
            metrics = self._trainer.evaluate()
        finally:
            self._in_precut_eval = False
        return dict(metrics if metrics is not None else (self._precut_metrics or {}))

    def _metric_value(self, metrics: dict | None) -> float:
        metrics = metrics or {}
        if self._metric not in metrics:
            raise KeyError(
                f"pragmatic mode compares {self._metric!r}, but the evaluation returned {sorted(metrics)}; set "
                "metric_for_pragmatic to one of those"
            )
        return float(metrics[self._metric])

    def _compare_and_maybe_rollback(self, args, state, model, optimizer, value: float, at_step) -> bool:
        before = float(self.pending["metric_before"])
        drop = (before - value) if self._greater else (value - before)
        # every rank must take the same decision (metrics are gathered, but be safe)
        (rollback,) = broadcast_objects(
            [bool(drop > self.pragmatic_tolerance)], what=f"the rollback decision of step {state.global_step}"
        )
        cut_step = int(self.pending["step"])
        if not rollback:
            logger.info(
                "CompreSSM pragmatic: cut at step %d kept (%s %.4g -> %.4g)",
                cut_step,
                self._metric,
                before,
                value,
            )
            self.pending, self._snapshot = None, None
            return False
        if self._snapshot is None:
            warnings.warn(
                f"CompreSSM pragmatic: the cut at step {cut_step} should be rolled back ({self._metric} "
                f"{before:.4g} -> {value:.4g}) but its snapshot is not available; the cut is kept, cutting stops",
                stacklevel=2,
            )
            self.pending, self.stopped = None, True
            return True
        layers = find_reducible_layers(model)
        sizes_before = [int(layer.state_size) for layer in layers]
        restore_training_state(model, optimizer, layers, self._snapshot)
        wrapped = getattr(self._trainer, "model_wrapped", None)
        if wrapped is not None and wrapped is not model:
            rebuild_ddp_in_place_(wrapped)
        sizes_after = [int(layer.state_size) for layer in layers]
        event = {
            "kind": "rollback",
            "step": int(state.global_step),
            "epoch": state.epoch,
            "restored_step": cut_step,
            "metric": self._metric,
            "greater_is_better": self._greater,
            "metric_before": before,
            "metric_after": value,
            "tolerance": self.pragmatic_tolerance,
            "sizes_before": sizes_before,
            "sizes_after": sizes_after,
        }
        self.history.append(jsonable(event))
        self.pending, self._snapshot, self.stopped = None, None, True
        self._sync_config(model, layers)
        self._emit(args, state, event)
        logger.warning(
            "CompreSSM pragmatic: %s went %.4g -> %.4g after the cut at step %d (tolerance %g): rolled back to "
            "sizes %s; no further cuts",
            self._metric,
            before,
            value,
            cut_step,
            self.pragmatic_tolerance,
            sizes_after,
        )
        return True

    def _load_pending_snapshot(self, args, state) -> None:
        folder = _resume_checkpoint_on_stack() or os.path.join(
            args.output_dir, f"checkpoint-{state.global_step}"
        )
        path = os.path.join(folder, SNAPSHOT_NAME)
        if os.path.isfile(path):
            self._snapshot = torch.load(path, map_location="cpu", weights_only=True)
            self._snapshot["sizes"] = {int(k): int(v) for k, v in self._snapshot["sizes"].items()}
        else:
            warnings.warn(
                f"resumed with a pragmatic cut (step {self.pending['step']}) awaiting evaluation, but {path} is "
                "missing; the cut will be kept without comparison",
                stacklevel=2,
            )
            self.pending = None
