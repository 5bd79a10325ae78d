"""``CompreSSMCallback``: CompreSSM inside ``transformers.Trainer``.

At scheduled optimizer steps the callback shrinks every reducible SSM layer of the model (any
module implementing :class:`compressm_hf.ReducibleSSM`) through :func:`compressm_hf.engine.compress_model`,
and adds what belongs to training: the optimizer transplant and DDP agreement/rebuild
(:mod:`.surgery`), the history in ``model.config.compression`` and ``compression_report.json``
(:mod:`.report`), logs through ``Trainer.log``. Its other jobs live next door: finding the Trainer
(:mod:`.trainer_lookup`), checkpoint integrity (:mod:`.checkpoints`), health checks (:mod:`.health`),
pragmatic rollback (:mod:`.rollback`).

Usage::

    from compressm_hf import CompreSSMCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CompreSSMCallback(tau=0.05)])
    trainer.train()

Lifecycle (the hooks below, in the order a run calls them)
-----------------------------------------------------------
``on_init_end``: refuses FSDP/DeepSpeed, quarantines half-written checkpoints.
``on_train_begin``: finds the Trainer (an error under DDP if it cannot), validates what needs the run
(schedule against ``max_steps``, a reducible layer, pragmatic evaluation), restores the state on resume.
``on_step_begin`` / ``on_pre_optimizer_step``: statistics of selective layers before an attempt; whether the
attempt's gradient is all zero.
``on_step_end`` (optimizer-step boundaries only, never inside gradient accumulation): at a scheduled step,
the health check (a broken run is never cut, see ``on_nonfinite``), then the cut; in pragmatic mode it asks
the Trainer for an evaluation instead (``control.should_evaluate``). The step's loss entry is always logged
and its checkpoint/evaluation already sees the compressed model.
``on_evaluate`` (pragmatic mode): judges the pending cut (rollback if the metric dropped too much), then
snapshots and cuts at an attempt.
``on_save`` / ``on_train_end``: the report (and a pending cut's snapshot) into the checkpoint / output folder.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from compressm_hf import find_reducible_layers
from compressm_hf.budget import attempt_targets, budget_from_mean, minimum_total
from compressm_hf.engine import (
    MAX_POLE_MODULUS,  # noqa: F401  (re-exported: it lived here)
    check_state_sizes,
    compress_model,
    plan_layers,
    record_compression,
)
from compressm_hf.settings import (  # noqa: F401  (MODES ... _check_budget_args: re-exported, they lived here)
    MODES,
    NONFINITE_ACTIONS,
    SELECTIONS,
    CompreSSMConfig,
    _check_budget_args,
    _check_report_name,
    _is_number,
)

from .checkpoints import (
    INCOMPLETE_SUFFIX,  # noqa: F401  (re-exported: it lived here)
    is_complete_checkpoint,
    last_complete_checkpoint,
    quarantine_incomplete_checkpoints,
)
from .health import (
    HealthCheck,
    NonFiniteTrainingWarning,
    health_entry,
    skipped_event,
    warn_health,
)
from .hub import protect_hub_token
from .peft_io import enable_compressed_adapter_saving
from .report import build_report, config_record, event_log_payload, jsonable, write_report
from .rollback import (
    SNAPSHOT_NAME,
    load_snapshot,
    metric_value,
    resolve_metric,
    restore_cut,
    rollback_event,
    save_snapshot,
    should_roll_back,
    snapshot_training_state,
)
from .schedule import CompressionSchedule, ShortRunWarning  # noqa: F401  (CompressionSchedule: re-exported)
from .surgery import (
    apply_ddp_timeout,
    broadcast_objects,
    distributed_barrier,
    distributed_rank,
    is_distributed,
    rebuild_ddp_in_place_,
    transplant_optimizer_state,
)
from .trainer_lookup import (
    _resume_checkpoint_on_stack,
    find_trainer,
    refuse_unsupported_wrapper,
    resolve_trainer,
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


def _set_statistics(model: torch.nn.Module, enabled: bool, reset: bool = False) -> None:
    """Switch surrogate-statistics collection of selective layers (those that have it) on or off."""
    for layer in find_reducible_layers(model):
        if hasattr(layer, "collect_statistics"):
            layer.collect_statistics = bool(enabled)
            if reset and callable(getattr(layer, "reset_statistics", None)):
                layer.reset_statistics()


class CompreSSMCallback(TrainerCallback, ExportableState):
    """Compress SSM layers while they train (CompreSSM, arXiv 2510.02823).

    ``CompreSSMCallback(config)`` takes a :class:`~compressm_hf.CompreSSMConfig`; ``CompreSSMCallback(tau=0.05,
    ...)`` takes its fields as keyword arguments (and builds one); ``CompreSSMCallback()`` uses every default.
    Giving both a config and keywords is a ``TypeError``. The settings are validated once, by the config; the
    callback keeps them as ``self.config`` and as plain attributes (``self.tau``, ``self.mode``, ...).

    Args:
        config: the settings (:class:`~compressm_hf.CompreSSMConfig`); or, as keyword arguments:
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
        schedule: a :class:`CompressionSchedule`, or a list of explicit optimizer steps (keyword only; unpacked
            into the config's ``window`` / ``attempts`` / ``steps``).
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
        TypeError: a config together with keyword settings, or an unknown keyword.
        ValueError: at construction for bad arguments; at ``on_train_begin`` for a schedule
            that does not fit the run, a model without reducible layers, or pragmatic mode
            without evaluation.
    """

    def __init__(self, config: CompreSSMConfig | None = None, **kwargs) -> None:
        if config is not None and kwargs:
            raise TypeError(
                f"CompreSSMCallback takes a CompreSSMConfig or keyword settings, not both (got a config and "
                f"{sorted(kwargs)}); use dataclasses.replace(config, ...) to change a config"
            )
        if config is None:
            config = CompreSSMConfig.from_kwargs(**kwargs)
        elif _is_number(config):  # CompreSSMCallback(0.05): tau, the first positional argument before
            config = CompreSSMConfig(tau=config)
        elif not isinstance(config, CompreSSMConfig):
            raise TypeError(f"config must be a CompreSSMConfig (or leave it out), got {config!r}")
        self.config = config
        # plain copies of every setting (self.tau, self.mode, ...), read across the callback and by users
        for name, value in config.to_dict().items():
            setattr(self, name, value)
        self.schedule = config.schedule
        self.policy = config.policy()

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
        self._awaiting_eval: int | None = None  # pragmatic: the attempt step whose evaluation decides its cut
        self._unlogged: list[dict] = []
        self._health = HealthCheck()  # the run's health checks (see .health)
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
        """The ``"config"`` of the report: :meth:`CompreSSMConfig.to_dict` (so
        :meth:`CompreSSMConfig.from_pretrained` repeats the run) plus what the run derived from it:
        ``schedule`` (the schedule's own description), ``budget_total`` (a state budget as a total, known at
        ``on_train_begin``) and ``pragmatic_metric`` (the metric and direction pragmatic mode compares, once
        resolved against the TrainingArguments; else None). JSON-friendly."""
        return {
            **self.config.to_dict(),
            "schedule": self.schedule.to_dict(),
            "budget_total": self._budget_total,
            "pragmatic_metric": (
                {"name": self._metric, "greater_is_better": self._greater} if self._metric else None
            ),
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
        return {
            "args": self.config.to_dict(),  # every CompreSSMConfig field: CompreSSMCallback(**args)
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
        refuse_unsupported_wrapper(trainer, args)
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

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        apply_ddp_timeout(getattr(args, "ddp_timeout", None))  # a no-op unless added after on_init_end
        self._trainer = resolve_trainer(self._trainer if self._bound else None)
        refuse_unsupported_wrapper(self._trainer, args)
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
            self._metric, self._greater = resolve_metric(
                args, self._trainer, self.metric_for_pragmatic, self.greater_is_better
            )
        self._restore_or_reset(state)
        self._snapshot, self._awaiting_eval = None, None
        self._health = HealthCheck(state.global_step)
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
        self._sync_config(model)
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
            self._health.note_gradient(upcoming, model)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        if step not in self._steps or step in self.done_steps:
            return control
        self.done_steps.append(step)
        if self.stopped:
            return control
        # Trainer.log (our metrics) ends in on_log, which clears control.should_log: the Trainer would
        # then drop the training-loss entry of this step.
        log_requested = bool(control.should_log)
        problems = self._health.problems(model, state, at_attempt=True)
        if problems:
            self._skip_attempt(args, state, control, model, problems)
        elif self.mode == "pragmatic":
            # The cut waits for the pre-cut metric: the Trainer evaluates right after this event (after
            # logging this step's loss) and on_evaluate compares, snapshots and cuts.
            self._awaiting_eval = step
            control.should_evaluate = True
        else:
            self._reduce(args, state, model, optimizer)
        control.should_log = bool(control.should_log) or log_requested
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, optimizer=None, **kwargs):
        if self.mode != "pragmatic" or self.stopped:
            return control
        step = int(state.global_step)
        if self._awaiting_eval == step:  # the attempt of this step: judge the last cut, then cut again
            self._awaiting_eval = None
            value = metric_value(metrics, self._metric)
            if self.pending is not None and self._judge_cut(args, state, model, optimizer, value):
                return control
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
        elif self.pending is not None and step > int(self.pending["step"]):  # trained since the cut
            self._judge_cut(args, state, model, optimizer, metric_value(metrics, self._metric))
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
                save_snapshot(self._snapshot, checkpoint)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.mode == "pragmatic" and self.pending is not None:
            logger.warning(
                "CompreSSM pragmatic: training ended before an evaluation judged the cut at step %s; it is kept",
                self.pending["step"],
            )
        if model is not None:
            problems = self._health.problems(model, state, at_attempt=False)
            if problems:
                self.health.append(health_entry(state.global_step, "train_end", "warned", problems))
                warn_health(state.global_step, "train_end", "warned", problems)
        if state.is_world_process_zero and args.output_dir:
            write_report(os.path.join(args.output_dir, self.report_name), self.report(model))
        return control

    # ------------------------------------------------------------------ helpers of the hooks

    def _restore_or_reset(self, state) -> None:
        """A resumed run takes the exported state back (see :meth:`state`); a fresh one starts empty."""
        if state.global_step == 0:
            self.history, self.done_steps, self.stopped, self.pending = [], [], False, None
            self.original_sizes = None
            self.health, self.training_stopped = [], None
            return
        data = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(data, list):
            data = data[0] if data else None
        if isinstance(data, dict) and "attributes" in data:
            self._restore_attributes(data["attributes"])
        elif not self.history:
            warnings.warn(
                "resuming without a saved CompreSSMCallback state: the compression history starts empty; "
                f"attempts at steps <= {state.global_step} are skipped",
                stacklevel=3,
            )

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

    def _skip_attempt(self, args, state, control, model, problems: list[str]) -> None:
        """An attempt on a broken run: no cut; a ``"skipped"`` event, a health record, maybe stop training."""
        step, reason = int(state.global_step), "; ".join(problems)
        stop = self.on_nonfinite == "stop"
        _set_statistics(model, False, reset=True)
        event = skipped_event(state, find_reducible_layers(model), reason, self.optimizer_state)
        self.history.append(jsonable(event))
        if stop:
            control.should_training_stop = True
            self.training_stopped = f"step {step}: {reason}"
        action = "stopped" if stop else "skipped"
        self.health.append(health_entry(step, "attempt", action, problems))
        warn_health(step, "attempt", action, problems)
        self._sync_config(model)
        self._emit(args, state, event)

    # ------------------------------------------------------------------ the reduction

    @torch.no_grad()
    def _reduce(self, args, state, model, optimizer) -> dict:
        """One cut: rank 0 plans, every rank applies the same plans (:mod:`compressm_hf.engine`), then the
        training's share: optimizer transplant, DDP rebuild, history, config record, logs, report."""
        step = int(state.global_step)
        t_event, cpu_event = time.perf_counter(), time.process_time()
        plans = self._plan(step, find_reducible_layers(model)) if distributed_rank() == 0 else None
        if is_distributed():
            (plans,) = broadcast_objects([plans], what=f"the compression plan of step {step}")
        _set_statistics(model, False, reset=True)
        cut = compress_model(model, plans=plans)
        counts = {}
        if cut.swaps:
            if optimizer is not None:
                counts = transplant_optimizer_state(optimizer, cut.swaps, self.optimizer_state)
            self._rebuild_ddp(model)
        event = {
            "kind": "reduction",
            "step": step,
            "epoch": state.epoch,
            "sizes_before": cut.sizes_before,
            "sizes_after": cut.sizes_after,
            "layers_reduced": cut.layers_reduced,
            "optimizer_state": self.optimizer_state,
            "optimizer_counts": counts,
            "wall_time_s": time.perf_counter() - t_event,
            "cpu_time_s": time.process_time() - cpu_event,  # process CPU time, all threads
            "layers": cut.layers,
        }
        if cut.budget is not None:
            event["budget"] = cut.budget
        self.history.append(jsonable(event))
        self._sync_config(model)
        self._emit(args, state, event)
        logger.info("CompreSSM step %d: state sizes %s -> %s", step, cut.sizes_before, cut.sizes_after)
        return event

    def _plan(self, step: int, layers):
        """Rank 0's :class:`~compressm_hf.engine.LayerPlans` of one attempt.

        With a state budget the attempt's target comes from :func:`~compressm_hf.budget.attempt_targets` and
        the engine finds the ``tau`` shared by every layer; the report's ``"budget"`` record says which
        attempt it was.
        """
        if self._budget_total is None:
            return plan_layers(layers, self.policy, seed=self.seed, step=step)
        attempt = self._steps.index(step) + 1 if step in self._steps else len(self._steps)
        attempts = max(1, len(self._steps))
        original = sum(self.original_sizes or [int(layer.state_size) for layer in layers])
        target = attempt_targets(original, self._budget_total, attempts, self.budget_schedule)[attempt - 1]
        plans = plan_layers(layers, self.policy, seed=self.seed, step=step, target_total=target)
        plans.budget = {
            "target_total_state": self._budget_total,
            "schedule": self.budget_schedule,
            "attempt": attempt,
            "attempts": attempts,
            **plans.budget,
        }
        if not plans.budget.get("met", True):
            warnings.warn(
                f"CompreSSM step {step}: attempt {attempt}/{attempts} aims at a total state size of {target} but "
                f"can reach only {plans.budget['planned_total']} (min_state_size={self.min_state_size}, round_to="
                f"{self.round_to}, gate={self.gate}, {len(plans.skipped)} layer(s) skipped); cutting as far "
                "as allowed",
                stacklevel=3,
            )
        return plans

    def _rebuild_ddp(self, model) -> None:
        """Rebuild the Trainer's DDP wrapper in place after the parameters changed (no-op without DDP)."""
        wrapped = getattr(self._trainer, "model_wrapped", None)
        if wrapped is not None and wrapped is not model:
            rebuild_ddp_in_place_(wrapped)

    def _sync_config(self, model) -> None:
        """Check ``config.state_sizes`` (the layers write it) and record the history in ``config.compression``."""
        check_state_sizes(model)
        record_compression(
            model,
            config_record(
                tau=self.tau,
                mode=self.mode,
                original_sizes=self.original_sizes,
                events=self.history,
                target_total_state=self._budget_total,
                settings=self.config.to_dict(),
            ),
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

    # ------------------------------------------------------------------ pragmatic mode (see .rollback)

    def _judge_cut(self, args, state, model, optimizer, value: float) -> bool:
        """Compare ``value`` with the pending cut's pre-cut metric; roll back (True) if it dropped too much."""
        before, cut_step = float(self.pending["metric_before"]), int(self.pending["step"])
        if not should_roll_back(
            before, value, self._greater, self.pragmatic_tolerance, int(state.global_step)
        ):
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
                stacklevel=3,
            )
            self.pending, self.stopped = None, True
            return True
        sizes = restore_cut(model, optimizer, self._snapshot, getattr(self._trainer, "model_wrapped", None))
        event = rollback_event(
            state, cut_step, self._metric, self._greater, before, value, self.pragmatic_tolerance, sizes
        )
        self.history.append(jsonable(event))
        self.pending, self._snapshot, self.stopped = None, None, True
        self._sync_config(model)
        self._emit(args, state, event)
        logger.warning(
            "CompreSSM pragmatic: %s went %.4g -> %.4g after the cut at step %d (tolerance %g): rolled back to "
            "sizes %s; no further cuts",
            self._metric,
            before,
            value,
            cut_step,
            self.pragmatic_tolerance,
            sizes[1],
        )
        return True

    def _load_pending_snapshot(self, args, state) -> None:
        """On resume: the snapshot of a cut still awaiting its evaluation, from the checkpoint resumed."""
        folder = _resume_checkpoint_on_stack() or os.path.join(
            args.output_dir, f"checkpoint-{state.global_step}"
        )
        self._snapshot = load_snapshot(folder)
        if self._snapshot is None:
            warnings.warn(
                f"resumed with a pragmatic cut (step {self.pending['step']}) awaiting evaluation, but "
                f"{os.path.join(folder, SNAPSHOT_NAME)} is missing; the cut will be kept without comparison",
                stacklevel=3,
            )
            self.pending = None
