"""``CompreSSMConfig``: every CompreSSM compression setting in one documented, validated dataclass.

One vocabulary for the library, both command lines and the saved files:

* ``CompreSSMCallback(CompreSSMConfig(tau=0.05))`` and ``CompreSSMCallback(tau=0.05)`` are the same callback
  (keyword arguments build a ``CompreSSMConfig``);
* ``compressm-train`` parses these fields with ``transformers.HfArgumentParser`` (``--help`` shows the
  ``help`` of each field below), ``compressm-analyze`` builds its rank-policy flags from them;
* the callback saves :meth:`CompreSSMConfig.to_dict` into ``config.compression["settings"]`` and the
  ``"config"`` of ``compression_report.json``, and :meth:`CompreSSMConfig.from_pretrained` reads it back, so a
  run can be repeated from its folder.

Every default comes from :mod:`compressm_hf.trainer.defaults` (the paper's, with the reasoning). The settings
are validated once, in ``__post_init__``; a bad value raises ``ValueError`` naming the value and what is
allowed. ``min_state_size`` / ``round_to`` are the user names of :class:`~compressm_hf.RankPolicy`'s
``min_rank`` / ``multiple_of``; :meth:`CompreSSMConfig.policy` is the one place that maps them.

Example::

    >>> from compressm_hf import CompreSSMConfig
    >>> config = CompreSSMConfig(tau=0.05, steps=[100, 200])
    >>> CompreSSMConfig.from_dict(config.to_dict()) == config
    True
    >>> config.policy().min_rank
    1
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .budget import BUDGET_SCHEDULES
from .rank import RankPolicy
from .trainer import defaults
from .trainer.report import REPORT_NAME
from .trainer.schedule import CompressionSchedule
from .trainer.surgery import OPTIMIZER_STATE_MODES

__all__ = ["MODES", "NONFINITE_ACTIONS", "SELECTIONS", "CompreSSMConfig", "InvalidSettingError"]

MODES = ("tolerance", "fixed", "pragmatic")
SELECTIONS = ("largest", "smallest", "random")
NONFINITE_ACTIONS = ("warn", "stop")


class InvalidSettingError(ValueError):
    """A CompreSSM setting has a bad value (the message names the setting, the value and what is allowed)."""


# Keys the callback's report adds next to the settings (derived at run time, not settings).
DERIVED_KEYS = ("schedule", "budget_total", "pragmatic_metric")


def _is_number(x) -> bool:
    """A finite int/float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


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


def _check_budget_args(tau, mode, target_total_state, target_mean_state, budget_schedule) -> bool:
    """Validate the state-budget settings; True if a budget is given."""
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


def _check_tau(tau, required: bool) -> float | None:
    if tau is None and not required:
        return None
    if not _is_number(tau) or not 0.0 <= float(tau) < 1.0:
        allowed = (
            "a number in [0, 1) (discarded fraction of sum(HSV))"
            if required
            else "a number in [0, 1) or None"
        )
        raise ValueError(f"tau must be {allowed}, got {tau!r}")
    return float(tau)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class CompreSSMConfig:
    """The settings of one CompreSSM run (each field's ``help`` is its short description; the details follow).

    Rank rule (``mode``): ``"tolerance"`` (the paper's main method: each layer keeps the smallest rank holding
    ``1 - tau`` of ``sum(sigma)``; ``tau`` defaults to 0.1, the largest value of the paper's grid {0.02, ...,
    0.10, 0.15} short of the most aggressive one), ``"fixed"`` (cut ``fixed_fraction`` of the states per
    attempt) or ``"pragmatic"`` (``"fixed"``; before each cut the model and optimizer are snapshotted (CPU
    copies) with a fresh evaluation, and at the next evaluation a drop of ``metric_for_pragmatic`` larger than
    ``pragmatic_tolerance`` restores the pre-cut state exactly and stops cutting for good). A layer is cut only
    if its new rank is ``< gate * n`` (0.95); ``min_state_size`` and ``round_to`` bound and round new sizes;
    ``selection`` keeps the dominant balanced states (``"largest"``) or, for the paper's App. C.1 ablations,
    ``"smallest"`` / ``"random"`` (seeded by ``seed`` per step and layer, so a resumed run draws the same).

    Schedule: ``window`` / ``attempts`` (fractions of ``max_steps``; default 4 attempts in ``(0.0, 0.1)``, the
    learning-rate warm-up, so 90% of training runs on the smaller model), or explicit ``steps`` (which win).
    :attr:`schedule` is the :class:`~compressm_hf.trainer.CompressionSchedule` they describe. Selective layers
    (Mamba, Mamba-2) build their averaged LTI surrogate from running statistics of real training batches,
    collected during the ``statistics_steps`` optimizer steps before every attempt and reset after it; a run
    too short for that gets one ``ShortRunWarning`` at ``on_train_begin`` naming what to change.

    State budget (instead of ``tau``, with ``mode="tolerance"``): ``target_total_state`` (states summed over
    the reducible layers) or ``target_mean_state`` (``floor(mean * num_layers)``). At every attempt the one
    ``tau`` shared by all layers that gives the largest total not above that attempt's target is found exactly
    (:func:`compressm_hf.budget.tau_for_budget`, respecting ``gate``, ``min_state_size`` and ``round_to``);
    ``budget_schedule="geometric"`` makes attempt ``k`` of ``K`` aim at ``N0 * (budget / N0) ** (k / K)`` (each
    attempt removes about the same fraction), ``"direct"`` aims at the budget every time; the last attempt
    aims at the budget itself. An unreachable budget raises at ``on_train_begin``.

    Optimizer (``optimizer_state``): ``"slice"`` carries the Adam moments of the cut tensors (by index when
    the layer reports the kept states, else the leading entries, like the reference code), ``"reset"`` gives
    fresh zero moments; the scalar ``step`` is always kept. Health (``on_nonfinite``): a diverged or
    signal-free run (:mod:`compressm_hf.trainer.health`) is never cut; ``"warn"`` skips the attempt loudly,
    ``"stop"`` also stops the training. Files: ``report_name`` (a plain ``.json`` name, written into
    ``output_dir`` and every checkpoint); ``skip_incomplete_checkpoints`` renames the ``checkpoint-N`` folders
    a killed process left half-written to ``checkpoint-N.incomplete`` when the Trainer is built, so
    ``resume_from_checkpoint=True`` takes the last complete one (nothing is deleted).

    Raises:
        InvalidSettingError: (a ``ValueError``) at construction, for any bad value; the message names the
            field, the value and what is allowed.
    """

    tau: float | None = field(
        default=None,
        metadata=_help(
            "Discarded fraction of each layer's Hankel-singular-value sum per attempt, in [0, 1) (mode "
            f"tolerance; default {defaults.TAU}). Not with a state budget."
        ),
    )
    mode: str = field(
        default=defaults.MODE,
        metadata=_help(
            "Rank rule: tolerance (keep 1 - tau of the HSV sum), fixed (cut fixed_fraction per attempt) or "
            "pragmatic (fixed, rolled back when the eval metric drops by more than pragmatic_tolerance).",
            choices=list(MODES),
        ),
    )
    window: list[float] = field(
        default_factory=lambda: list(defaults.WINDOW),
        metadata=_help(
            "Start and end of the compression window, as fractions of max_steps (the paper: the learning-rate "
            "warm-up, the first 10%%)."
        ),
    )
    attempts: int = field(
        default=defaults.ATTEMPTS, metadata=_help("Equally spaced attempts inside the window.")
    )
    steps: list[int] | None = field(
        default=None, metadata=_help("Explicit optimizer steps of the attempts (overrides window/attempts).")
    )
    gate: float = field(
        default=defaults.GATE, metadata=_help("Cut a layer only if the new size is < gate * n, in (0, 1].")
    )
    min_state_size: int = field(
        default=defaults.MIN_STATE_SIZE, metadata=_help("Never shrink a layer below this many states.")
    )
    round_to: int = field(
        default=defaults.ROUND_TO, metadata=_help("Round every new size up to a multiple of this.")
    )
    selection: str = field(
        default=defaults.SELECTION,
        metadata=_help(
            "Which states to keep: largest (balanced truncation), smallest or random (ablations).",
            choices=list(SELECTIONS),
        ),
    )
    fixed_fraction: float = field(
        default=defaults.FIXED_FRACTION,
        metadata=_help("Modes fixed and pragmatic: fraction of the states cut per attempt, in (0, 1)."),
    )
    optimizer_state: str = field(
        default=defaults.OPTIMIZER_STATE,
        metadata=_help(
            "Adam moments of the cut tensors: carried over (slice) or fresh zeros (reset).",
            choices=list(OPTIMIZER_STATE_MODES),
        ),
    )
    pragmatic_tolerance: float = field(
        default=defaults.PRAGMATIC_TOLERANCE,
        metadata=_help("Mode pragmatic: largest allowed drop of the eval metric before a rollback (>= 0)."),
    )
    metric_for_pragmatic: str | None = field(
        default=None,
        metadata=_help(
            "Mode pragmatic: the eval metric compared (default: metric_for_best_model, else eval_loss)."
        ),
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata=_help(
            "Direction of metric_for_pragmatic (default: the Trainer's for metric_for_best_model, else "
            "False for names ending in loss/perplexity/error)."
        ),
    )
    seed: int = field(
        default=defaults.SEED,
        metadata=_help("Seed of selection random (per step and layer, so a resumed run draws the same)."),
    )
    log_per_layer: bool = field(
        default=True, metadata=_help("Also log per-layer sizes, energy kept and error bounds.")
    )
    statistics_steps: int = field(
        default=defaults.STATISTICS_STEPS,
        metadata=_help(
            "Selective layers (Mamba, Mamba-2): optimizer steps of surrogate statistics collected before "
            "each attempt (>= 1)."
        ),
    )
    report_name: str = field(
        default=REPORT_NAME,
        metadata=_help(
            "File name of the JSON report in output_dir and every checkpoint (a plain .json name)."
        ),
    )
    skip_incomplete_checkpoints: bool = field(
        default=True,
        metadata=_help(
            "Rename half-written checkpoint-N folders to checkpoint-N.incomplete when the Trainer is built."
        ),
    )
    on_nonfinite: str = field(
        default=defaults.ON_NONFINITE,
        metadata=_help(
            "A diverged or signal-free run (NaN/Inf, zero gradient): skip the attempt and warn, or stop.",
            choices=list(NONFINITE_ACTIONS),
        ),
    )
    target_total_state: int | None = field(
        default=None,
        metadata=_help("A state budget instead of tau: the total state size (summed over layers) to end at."),
    )
    target_mean_state: float | None = field(
        default=None,
        metadata=_help("The state budget as a mean per layer (exclusive with target_total_state)."),
    )
    budget_schedule: str = field(
        default=defaults.BUDGET_SCHEDULE,
        metadata=_help(
            "How a budget applies across attempts: geometric (equal-ratio steps) or direct.",
            choices=list(BUDGET_SCHEDULES),
        ),
    )

    def __post_init__(self) -> None:
        try:
            self._validate()
        except InvalidSettingError:
            raise
        except ValueError as exc:  # one type for every bad setting (compressm-train makes it a usage error)
            raise InvalidSettingError(str(exc)) from None

    def _validate(self) -> None:
        """Check every field and normalize it (floats, plain lists); ``tau=None`` becomes the default tau
        when the tolerance rule needs one."""
        if (
            isinstance(self.statistics_steps, bool)
            or not isinstance(self.statistics_steps, int)
            or self.statistics_steps < 1
        ):
            raise ValueError(f"statistics_steps must be an int >= 1, got {self.statistics_steps!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(
                f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {self.optimizer_state!r}"
            )
        budget = _check_budget_args(
            self.tau, self.mode, self.target_total_state, self.target_mean_state, self.budget_schedule
        )
        tau_required = self.mode == "tolerance" and not budget
        if tau_required and self.tau is None:  # the one default tau, shared with compressm-train
            self.tau = defaults.TAU
        self.tau = _check_tau(self.tau, required=tau_required)
        if not _is_number(self.pragmatic_tolerance) or self.pragmatic_tolerance < 0:
            raise ValueError(f"pragmatic_tolerance must be a number >= 0, got {self.pragmatic_tolerance!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.metric_for_pragmatic is not None and not isinstance(self.metric_for_pragmatic, str):
            raise ValueError(f"metric_for_pragmatic must be a metric name, got {self.metric_for_pragmatic!r}")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise ValueError(f"greater_is_better must be True, False or None, got {self.greater_is_better!r}")
        if not isinstance(self.on_nonfinite, str) or self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {self.on_nonfinite!r}")
        _check_report_name(self.report_name)
        self._normalize_schedule()
        self.policy()  # the rank-policy fields (gate, min_state_size, round_to, fixed_fraction)
        self.gate = float(self.gate)
        self.fixed_fraction = float(self.fixed_fraction)
        self.pragmatic_tolerance = float(self.pragmatic_tolerance)
        self.log_per_layer = bool(self.log_per_layer)
        self.skip_incomplete_checkpoints = bool(self.skip_incomplete_checkpoints)
        if self.target_mean_state is not None:
            self.target_mean_state = float(self.target_mean_state)

    def _normalize_schedule(self) -> None:
        """Validate window/attempts/steps through :class:`CompressionSchedule`; store them as plain lists."""
        window = defaults.WINDOW if self.window is None else self.window
        attempts = defaults.ATTEMPTS if self.attempts is None else self.attempts
        if isinstance(window, (list, tuple)) and len(window) != 2:
            raise ValueError(f"window takes two fractions (start, end) of max_steps, got {window!r}")
        steps = self.steps
        if isinstance(steps, range):
            steps = list(steps)
        schedule = CompressionSchedule(
            window=tuple(window) if isinstance(window, (list, tuple)) else window,
            attempts=attempts,
            steps=tuple(steps) if isinstance(steps, (list, tuple)) else steps,
        )
        self.window = [float(x) for x in schedule.window]
        self.attempts = int(schedule.attempts)
        self.steps = None if schedule.steps is None else [int(s) for s in schedule.steps]

    # ------------------------------------------------------------------ derived views

    @property
    def schedule(self) -> CompressionSchedule:
        """The :class:`~compressm_hf.trainer.CompressionSchedule` of ``window`` / ``attempts`` / ``steps``."""
        steps = None if self.steps is None else tuple(self.steps)
        return CompressionSchedule(window=tuple(self.window), attempts=self.attempts, steps=steps)

    def policy(self) -> RankPolicy:
        """The :class:`~compressm_hf.RankPolicy` of these settings (the one ``min_state_size -> min_rank`` and
        ``round_to -> multiple_of`` mapping). With a state budget (or outside the tolerance mode) its ``tau``
        is 0.0: the callback sets the tau of every attempt itself. Raises ValueError for bad policy fields,
        named as here."""
        try:
            return RankPolicy(
                tau=self.tau if self.mode == "tolerance" and self.tau is not None else 0.0,
                mode="tolerance" if self.mode == "tolerance" else "fixed",
                gate=self.gate,
                min_rank=self.min_state_size,
                multiple_of=self.round_to,
                selection=self.selection,
                fixed_fraction=self.fixed_fraction,
            )
        except ValueError as exc:  # CompreSSMError subclasses ValueError; rename the fields for users
            msg = str(exc).replace("min_rank", "min_state_size").replace("multiple_of", "round_to")
            raise ValueError(msg) from None

    def uncuttable_layers(self, layers) -> list[tuple[tuple[str, int], str]]:
        """``((setting, layer_idx), warning)`` for every layer that ``min_state_size`` or ``round_to`` forbid to
        cut (the setting is not below the layer's state size); the callback warns once per key."""
        found = []
        for name, value in (("min_state_size", self.min_state_size), ("round_to", self.round_to)):
            rule = (
                "no layer is shrunk below it"
                if name == "min_state_size"
                else "new sizes are rounded up to a multiple of it, capped at the state size"
            )
            for layer in layers if value > 1 else ():
                n, idx = int(layer.state_size), int(layer.layer_idx)
                if value >= n:
                    message = (
                        f"CompreSSM: {name}={value} is not below layer {idx}'s state size {n} "
                        f"({type(layer).__name__}): {rule}, so this layer can never be cut"
                    )
                    found.append(((name, idx), message))
        return found

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (lists, floats, ints, strings, bools, None)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompreSSMConfig:
        """The config of :meth:`to_dict` (or of a report's ``"config"``, whose derived entries
        ``schedule`` / ``budget_total`` / ``pragmatic_metric`` are skipped).

        Raises:
            TypeError: a key that is neither a field nor a derived entry (the message names them).
            ValueError: a bad value (as at construction).
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"CompreSSMConfig.from_dict needs a mapping of field names to values, got {data!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in DERIVED_KEYS)
        if unknown:
            raise TypeError(
                f"CompreSSMConfig.from_dict: unknown settings {unknown} (fields: {sorted(names)})"
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def of(cls, config: CompreSSMConfig | float | None = None, **kwargs) -> CompreSSMConfig:
        """The config of ``CompreSSMCallback(config, **kwargs)``: ``config`` itself, or one built from the keyword
        settings (:meth:`from_kwargs`), or ``CompreSSMConfig(tau=config)`` for a bare number (the callback's
        first positional argument used to be ``tau``).

        Raises:
            TypeError: a config together with keyword settings, an unknown keyword, or a ``config`` of
                another type.
        """
        if config is not None and kwargs:
            raise TypeError(
                f"CompreSSMCallback takes a CompreSSMConfig or keyword settings, not both (got a config and "
                f"{sorted(kwargs)}); use dataclasses.replace(config, ...) to change a config"
            )
        if config is None:
            return cls.from_kwargs(**kwargs)
        if _is_number(config):
            return cls(tau=config)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a CompreSSMConfig (or leave it out), got {config!r}")
        return config

    @classmethod
    def from_kwargs(cls, schedule=None, **kwargs) -> CompreSSMConfig:
        """The config of the callback's keyword arguments: ``schedule`` (a ``CompressionSchedule`` or a list
        of steps) is unpacked into ``window`` / ``attempts`` / ``steps`` (an explicit schedule wins).

        Raises:
            TypeError: an unknown keyword argument.
            ValueError: a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise TypeError(f"unknown CompreSSM setting(s) {unknown}; the settings are {sorted(names)}")
        if schedule is not None:
            merged = CompressionSchedule.coerce(
                schedule,
                window=kwargs.pop("window", None),
                attempts=kwargs.pop("attempts", None),
                steps=kwargs.pop("steps", None),
            )
            kwargs.update(window=list(merged.window), attempts=merged.attempts, steps=merged.steps)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CompreSSMConfig:
        """The settings a model folder (or a ``checkpoint-N``) was compressed with.

        Reads ``config.json``'s ``compression["settings"]`` (written by the callback), else the ``"config"``
        of ``compression_report.json`` (its fields; keys a post-hoc ``compressm-analyze`` report adds are
        skipped).

        Raises:
            FileNotFoundError: the folder holds neither record.
        """
        folder = os.fspath(folder)
        config_path = os.path.join(folder, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                compression = json.load(f).get("compression")
            if isinstance(compression, Mapping) and isinstance(compression.get("settings"), Mapping):
                return cls.from_dict(compression["settings"])
        report_path = os.path.join(folder, REPORT_NAME)
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as f:
                recorded = json.load(f).get("config")
            if isinstance(recorded, Mapping):
                names = {f.name for f in dataclasses.fields(cls)}
                return cls.from_dict({k: v for k, v in recorded.items() if k in names})
        raise FileNotFoundError(
            f"{folder} holds no CompreSSM settings: neither config.json with a compression['settings'] block "
            f"nor {REPORT_NAME} (is it a folder trained with CompreSSMCallback?)"
        )


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
