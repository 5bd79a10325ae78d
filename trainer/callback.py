"""``CompreSSMCallback``: CompreSSM inside ``transformers.Trainer``.

At scheduled optimizer steps the callback shrinks every reducible SSM layer of the model (any module
implementing :class:`compressm_hf.ReducibleSSM`). The file holds the class and its hooks, in the order a run
calls them; each job it delegates lives in one module next door: the settings (:class:`~compressm_hf.
CompreSSMConfig`), one cut inside training (:mod:`.distributed_cut`: rank 0 plans, every rank applies
:func:`compressm_hf.engine.compress_model`, the optimizer and DDP follow; FSDP2 through :mod:`.fsdp2`), a state
budget (:mod:`.state_budget`), finding the Trainer (:mod:`.trainer_lookup`), checkpoint integrity
(:mod:`.checkpoints`), health checks (:mod:`.health`), pragmatic rollback (:mod:`.rollback`), what survives a
checkpoint (:mod:`.callback_state`) and the report (:mod:`.report`). Logs go through ``Trainer.log``.

Usage::

    from compressm_hf import CompreSSMCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CompreSSMCallback(tau=0.05)])
    trainer.train()

Lifecycle (the hooks below, in the order a run calls them)
-----------------------------------------------------------
``on_init_end``: refuses FSDP1/DeepSpeed, quarantines half-written checkpoints.
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

# (F401 exemptions below: names still importable from here, where they lived before their modules existed)
import logging
import os
import warnings

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from compressm_hf import find_reducible_layers
from compressm_hf.engine import MAX_POLE_MODULUS, check_state_sizes, plan_layers, record_compression  # noqa: F401
from compressm_hf.protocol import require_reducible_layers
from compressm_hf.settings import MODES, NONFINITE_ACTIONS, SELECTIONS, CompreSSMConfig

from . import rollback
from .callback_state import export_state, restore_attributes, restore_or_reset
from .checkpoints import (  # noqa: F401
    INCOMPLETE_SUFFIX,
    is_complete_checkpoint,
    last_complete_checkpoint,
    quarantine_incomplete_checkpoints,
)
from .distributed_cut import cut_in_training
from .health import HealthCheck, NonFiniteTrainingWarning, health_entry, skipped_event, warn_health
from .hub import protect_hub_token
from .peft_io import enable_compressed_adapter_saving
from .report import build_report, config_record, event_log_payload, jsonable, reduction_event, write_report
from .resume import resize_for_fsdp2_resume
from .rollback import SNAPSHOT_NAME  # noqa: F401
from .schedule import CompressionSchedule, ShortRunWarning  # noqa: F401
from .state_budget import budget_total, plan_attempt
from .statistics import set_statistics
from .surgery import apply_ddp_timeout, distributed_barrier, is_distributed
from .trainer_lookup import (  # noqa: F401
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


class CompreSSMCallback(TrainerCallback, ExportableState):
    """Compress SSM layers while they train (CompreSSM, arXiv 2510.02823).

    ``CompreSSMCallback(config)`` takes a :class:`~compressm_hf.CompreSSMConfig`, whose fields document every
    setting (``tau``, ``mode``, the schedule, ``gate``, ``min_state_size``, ``round_to``, ``selection``,
    ``optimizer_state``, ``statistics_steps``, a state budget, pragmatic mode, ``on_nonfinite``, ...);
    ``CompreSSMCallback(tau=0.05, ...)`` takes the same fields as keywords (a ``schedule`` keyword may be a
    :class:`CompressionSchedule` or a list of steps) and ``CompreSSMCallback()`` uses every default (the
    paper's: 4 attempts in the first 10% of ``max_steps``, ``tau`` 0.1, gate 0.95). The settings are validated
    once, by the config; the callback keeps them as ``self.config`` and as plain attributes (``self.tau``, ...).

    Distribution: single process and DDP (``torchrun`` / ``accelerate launch --multi_gpu``, gloo on CPU
    included): rank 0 plans, every rank applies the same cut, DDP is rebuilt in place. Pass
    ``TrainingArguments(ddp_find_unused_parameters=False)`` when every parameter gets a gradient (true of the
    models here): transformers' default makes DDP search for unused parameters at every step. FSDP2
    (``fully_shard``; accelerate ``fsdp_version: 2``): each layer is gathered, cut and sharded again in place
    (:mod:`.fsdp2`; not with ``mode="pragmatic"``). FSDP1 and DeepSpeed flatten parameters and are refused
    (``ValueError`` when the Trainer is built).

    What is never lost: a layer whose system cannot be reduced at an attempt (NaN/Inf, unstable dynamics,
    missing statistics) is skipped with a warning and a ``"skipped"`` record; a run that diverged or learns
    nothing is not cut at all (:mod:`.health`; ``on_nonfinite``); the report and the pragmatic snapshot are
    written atomically (:class:`~compressm_hf.trainer.report.ReportWriteError` names the file on a full disk).

    Raises:
        TypeError: a config together with keyword settings, or an unknown keyword.
        ValueError: bad settings (at construction); at ``on_train_begin``, a schedule that does not fit the
            run, a model without reducible layers, an unreachable state budget or pragmatic mode without
            evaluation.
    """

    def __init__(self, config: CompreSSMConfig | None = None, **kwargs) -> None:
        self.config = config = CompreSSMConfig.of(config, **kwargs)
        # plain copies of every setting (self.tau, self.mode, ...), read across the callback and by users
        for name, value in config.to_dict().items():
            setattr(self, name, value)
        self.schedule = config.schedule
        self.policy = config.policy()

        restore_attributes(self, None)  # the exported state (history, done_steps, ...: see .callback_state)

        # --- runtime only ---
        self._trainer = None
        self._bound = False
        self._steps: list[int] = []
        self._snapshot: dict | None = None
        self._metric: str | None = None
        self._greater: bool = True
        self._awaiting_eval: int | None = None  # pragmatic: the attempt step whose evaluation decides its cut
        self._unlogged: list[dict] = []
        self._collecting: bool | None = None  # what on_step_begin last switched statistics collection to
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
        """Exported into ``TrainerState.stateful_callbacks`` at every checkpoint (see :mod:`.callback_state`)."""
        return export_state(self)

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer if self._bound else find_trainer()
        refuse_unsupported_wrapper(trainer, args)
        protect_hub_token(args)  # before the Trainer pickles args into any training_args.bin
        # transformers drops ddp_timeout on CPU (gloo): make it bound every collective, DDP's own included
        apply_ddp_timeout(getattr(args, "ddp_timeout", None))
        if self.skip_incomplete_checkpoints and args.output_dir:
            moved = quarantine_incomplete_checkpoints(args.output_dir) if args.should_save else []
            last = last_complete_checkpoint(args.output_dir) if moved else None
            for old, new in moved:
                warnings.warn(
                    f"{old} is an incomplete checkpoint (the process writing it was killed): renamed to {new} so "
                    f"that resume_from_checkpoint=True uses the last complete one ({last})",
                    stacklevel=2,
                )
            if is_distributed():  # every rank must see the same checkpoint list before train()
                distributed_barrier("the checkpoint-list barrier of on_init_end")
        resize_for_fsdp2_resume(trainer, args, model, report_name=self.report_name)  # before FSDP2 shards it
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        apply_ddp_timeout(getattr(args, "ddp_timeout", None))  # a no-op unless added after on_init_end
        self._trainer = resolve_trainer(self._trainer if self._bound else None)
        refuse_unsupported_wrapper(self._trainer, args)
        layers = require_reducible_layers(model, "CompreSSMCallback")
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
            self._metric, self._greater = rollback.resolve_metric(
                args, self._trainer, self.metric_for_pragmatic, self.greater_is_better, model=model
            )
        restore_or_reset(self, state)
        self._snapshot, self._awaiting_eval, self._collecting = None, None, None
        self._health = HealthCheck(state.global_step)
        sizes = [int(layer.state_size) for layer in layers]
        for key, message in self.config.uncuttable_layers(layers):
            if key not in self._warned_layers:
                self._warned_layers.add(key)
                warnings.warn(message, stacklevel=2)
        if self.original_sizes is None:
            self.original_sizes = sizes
        self._budget_total = budget_total(self.config, sizes, self.original_sizes)
        if self.history and list(self.history[-1]["sizes_after"]) != sizes:
            warnings.warn(
                f"the model's state sizes {sizes} differ from the last recorded compression event "
                f"({self.history[-1]['sizes_after']}); was the checkpoint loaded into the model?",
                stacklevel=2,
            )
        if self.pending is not None:  # resumed with a cut awaiting evaluation: its snapshot, or keep the cut
            self._snapshot = rollback.resume_snapshot(
                args.output_dir, state.global_step, self.pending["step"]
            )
            self.pending = self.pending if self._snapshot is not None else None
        self._sync_config(model)
        # Transformers only registers stateful callbacks present when TrainerState was created; a run
        # resumed from a checkpoint written without this callback would KeyError at the next save.
        if state.stateful_callbacks is not None and type(self).__name__ not in state.stateful_callbacks:
            state.stateful_callbacks[type(self).__name__] = self.state()
        logger.info("CompreSSM: %s; attempts at steps %s; sizes %s", self.config, self._steps, sizes)
        return control

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # The optimizer step about to run ends with global_step == state.global_step + 1.
        upcoming = [t for t in self._steps if t not in self.done_steps and t > state.global_step]
        collect = (
            bool(upcoming) and not self.stopped and upcoming[0] - state.global_step <= self.statistics_steps
        )
        if model is not None and collect != self._collecting:  # walk the model only when it changes
            set_statistics(model, collect)
            self._collecting = collect
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
            value = rollback.metric_value(metrics, self._metric)
            if self.pending is not None and self._judge_cut(args, state, model, optimizer, value):
                return control
            self._snapshot = rollback.snapshot_training_state(model, optimizer, find_reducible_layers(model))
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
            self._judge_cut(args, state, model, optimizer, rollback.metric_value(metrics, self._metric))
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
                rollback.save_snapshot(self._snapshot, checkpoint)
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

    def _skip_attempt(self, args, state, control, model, problems: list[str]) -> None:
        """An attempt on a broken run: no cut; a ``"skipped"`` event, a health record, maybe stop training."""
        step, reason = int(state.global_step), "; ".join(problems)
        stop = self.on_nonfinite == "stop"
        set_statistics(model, False, reset=True)
        self._collecting = False
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

    def _reduce(self, args, state, model, optimizer) -> dict:
        """One cut (:func:`.distributed_cut.cut_in_training`: rank 0 plans, every rank applies, the optimizer and
        DDP follow), then its record: history, ``config.compression``, logs, report."""
        step = int(state.global_step)
        cut = cut_in_training(
            model,
            optimizer,
            lambda layers: self._plan(step, layers),
            step=step,
            optimizer_state=self.optimizer_state,
            wrapped=getattr(self._trainer, "model_wrapped", None),
        )
        self._collecting = False  # the cut switched statistics off (and reset them)
        event = reduction_event(state, cut, self.optimizer_state)
        self.history.append(jsonable(event))
        self._sync_config(model)
        self._emit(args, state, event)
        logger.info(
            "CompreSSM step %d: state sizes %s -> %s", step, event["sizes_before"], event["sizes_after"]
        )
        return event

    def _plan(self, step: int, layers):
        """Rank 0's :class:`~compressm_hf.engine.LayerPlans` of one attempt (a state budget: :mod:`.state_budget`)."""
        if self._budget_total is None:
            return plan_layers(layers, self.policy, seed=self.seed, step=step)
        original = sum(self.original_sizes or [int(layer.state_size) for layer in layers])
        return plan_attempt(
            layers,
            self.config,
            step=step,
            steps=self._steps,
            total=self._budget_total,
            original_total=original,
        )

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
        """Judge the pending cut by ``value`` (:func:`.rollback.judge_cut`); True if cutting stops (rolled back)."""
        verdict, event = rollback.judge_cut(
            self.pending,
            self._snapshot,
            value,
            state=state,
            model=model,
            optimizer=optimizer,
            wrapped=getattr(self._trainer, "model_wrapped", None),
            metric=self._metric,
            greater=self._greater,
            tolerance=self.pragmatic_tolerance,
        )
        self.pending, self._snapshot = None, None
        if verdict == "kept":
            return False
        self.stopped = True
        if event is not None:
            self.history.append(jsonable(event))
            self._sync_config(model)
            self._emit(args, state, event)
        return True
