"""One compression event on a model: :func:`compress_model` (find layers, plan, apply, check).

"Apply a plan to every reducible layer" lives here, once, for every caller: the training callback
(``CompreSSMCallback``, which adds the optimizer transplant, the DDP agreement and rebuild, logs and report
files), the post-hoc ``compressm-analyze compress`` and the baselines (which bring their own plans).

Steps of :func:`compress_model`:

1. :func:`find_reducible_layers` (every :class:`~compressm_hf.ReducibleSSM`, in ``layer_idx`` order).
2. :func:`plan_layers`: per layer ``lti_system()`` -> :func:`check_pole_margin` ->
   :func:`~compressm_hf.plan_reduction`; a layer whose system cannot be reduced (any ``ValueError``:
   NaN/Inf, unstable or marginal poles, missing statistics) is skipped with a warning and its reason. With
   ``target_total`` (a state budget for this event) the layers' rank scores are computed first and
   :func:`~compressm_hf.budget.tau_for_budget` picks the one ``tau`` shared by all layers.
3. :func:`apply_plans`: ``layer.reduce_(plan)`` (a frozen parameter stays frozen), one report record per layer.
4. :func:`check_state_sizes`: every layer must have recorded its new size in ``model.config.state_sizes``
   (the mixer that changes its size is the one writer; this only checks).

Nothing here imports ``transformers``; the plans are plain picklable records, so a distributed caller can
plan on one rank (:func:`plan_layers`), broadcast the :class:`LayerPlans` and apply them everywhere
(``compress_model(model, plans=...)``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import tau_for_budget
from .errors import UnstableSystemError
from .planning import plan_reduction, rank_scores
from .protocol import ReductionPlan, as_param_swap, find_reducible_layers
from .rank import RankPolicy

__all__ = [
    "MAX_POLE_MODULUS",
    "CompressionEvent",
    "LayerPlans",
    "StateSizeMismatchError",
    "apply_plans",
    "as_layer_plans",
    "check_pole_margin",
    "check_state_sizes",
    "compress_model",
    "layer_generator",
    "plan_layers",
    "plan_record",
    "record_compression",
]

# ``rediagonalize`` clamps |lambda| to 1 - 1e-6: a layer with a pole closer to the unit circle than that is
# numerically marginal (its Gramians are ~1 / (1 - |lambda|^2) and a pole at |lambda| = 1 - 1e-16 passes the
# strict ``|lambda| < 1`` check while dominating every Hankel singular value): skip it instead of cutting it
# down to that one mode.
MAX_POLE_MODULUS = 1.0 - 1e-6


class StateSizeMismatchError(RuntimeError):
    """A layer changed its state size without recording it in ``model.config.state_sizes``."""


@dataclass
class LayerPlans:
    """The decision of one event, per layer (picklable: a distributed caller broadcasts it).

    Attributes:
        plans: ``layer_idx -> ReductionPlan`` for the layers to cut (absent: the layer keeps its size).
        seconds: ``layer_idx -> wall seconds`` spent planning the layer (added to its record).
        skipped: ``layer_idx -> "ErrorType: message"`` for the layers whose system could not be reduced.
        budget: with a state budget, ``{"attempt_target", "total_before", "within_budget", "tau", ...}``
            (see :func:`plan_layers`); ``None`` without one.
    """

    plans: dict[int, ReductionPlan] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    budget: dict | None = None


@dataclass
class CompressionEvent:
    """What :func:`compress_model` did.

    Attributes:
        swaps: every parameter replaced, as the layers returned them (``ParamSwap`` or duck-typed
            ``(old, new, state_dim, keep)`` tuples), for the optimizer transplant.
        layers: one record per reducible layer, in ``layer_idx`` order: ``layer_idx``, ``n_before``,
            ``n_after``, ``reduced``, then :func:`plan_record`'s fields for a cut layer or ``reason``
            (``"gate"``, ``"budget met"``, ``"skipped: ..."``) for the others, and ``wall_time_s``.
        sizes_before, sizes_after: per-layer state sizes (``layer_idx`` order).
        skipped: ``layer_idx -> reason`` of the layers skipped because their system could not be reduced.
        budget: the budget record of :class:`LayerPlans` (``None`` without a budget).
        wall_time_s: the whole event (planning included when :func:`compress_model` planned).
    """

    swaps: list = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    sizes_before: list[int] = field(default_factory=list)
    sizes_after: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    budget: dict | None = None
    wall_time_s: float = 0.0

    @property
    def layers_reduced(self) -> int:
        """How many layers were cut."""
        return sum(1 for record in self.layers if record["reduced"])


def layer_generator(seed: int, step: int, layer_idx: int) -> torch.Generator:
    """The ``torch.Generator`` of ``selection="random"`` for one layer at one event (reproducible on resume)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 8191 + int(layer_idx)) % (2**63 - 1))
    return g


def check_pole_margin(system) -> None:
    """Raise :class:`~compressm_hf.UnstableSystemError` if a pole of ``system`` has ``|lambda| > MAX_POLE_MODULUS``.

    ``system.A``: ``(..., n)`` diagonal or ``(n, n)`` dense. Empty or non-finite ``A`` passes (the planner
    reports NaN/Inf with the details).
    """
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


def plan_record(plan: ReductionPlan, n_after: int) -> dict[str, Any]:
    """The report fields of one layer that ``plan`` cut (``hsv`` stays a tensor; the report makes it JSON)."""
    return {
        "n_after": int(n_after),
        "reduced": True,
        "rule": plan.rule,
        "selection": plan.selection,
        "hsv": plan.hsv,
        "energy_kept": float(plan.energy_kept),
        "error_bound": float(plan.error_bound),
        "extra": plan.extra,
    }


def _skip(layer, exc: ValueError, skipped: dict[int, str], step: int | None) -> None:
    skipped[int(layer.layer_idx)] = f"{type(exc).__name__}: {exc}"
    when = "CompreSSM" if step is None else f"CompreSSM step {step}"
    warnings.warn(
        f"{when}: layer {layer.layer_idx} skipped, its system cannot be reduced "
        f"({type(exc).__name__}: {exc}); the layer is left unchanged",
        stacklevel=4,
    )


def _budget_tau(
    policy: RankPolicy, layers, scores: dict[int, torch.Tensor], target: int
) -> tuple[RankPolicy, dict]:
    """The policy meeting ``target`` (total state size) and the budget record (see :func:`plan_layers`)."""
    current = sum(int(layer.state_size) for layer in layers)
    fixed = sum(int(layer.state_size) for layer in layers if int(layer.layer_idx) not in scores)
    record = {
        "attempt_target": int(target),
        "total_before": current,
        "within_budget": current <= target or not scores,
        "tau": None,
    }
    if record["within_budget"]:
        return policy, record
    solution = tau_for_budget(
        [scores[idx] for idx in sorted(scores)], max(1, target - fixed), policy, on_unreachable="closest"
    )
    record.update(
        tau=solution.tau,
        tau_interval=list(solution.tau_interval),
        planned_total=solution.total + fixed,
        met=solution.total + fixed <= target,
    )
    return dataclasses.replace(policy, tau=solution.tau), record


@torch.no_grad()
def plan_layers(
    layers: Sequence[torch.nn.Module],
    policy: RankPolicy,
    *,
    seed: int = 0,
    step: int | None = None,
    target_total: int | None = None,
) -> LayerPlans:
    """Plan one event for ``layers`` (nothing is changed).

    Args:
        layers: the reducible layers (:func:`~compressm_hf.find_reducible_layers`).
        policy: the :class:`~compressm_hf.RankPolicy` (``tau`` is replaced per event with a budget).
        seed, step: seed the ``selection="random"`` draw of each layer (:func:`layer_generator`); ``step``
            also names the event in warnings (``None``: post hoc, seeded as step 0).
        target_total: a state budget for this event: the total state size (summed over ``layers``) not to
            exceed. The layers skipped here keep their size and count against it. ``None``: plan every layer
            with ``policy``.

    Returns:
        :class:`LayerPlans`; with a budget its ``budget`` record holds ``attempt_target``, ``total_before``,
        ``within_budget`` (then nothing is planned) and, when searched, ``tau``, ``tau_interval``,
        ``planned_total`` and ``met`` (False when even the strongest cut allowed stays above the target).
    """
    if not isinstance(policy, RankPolicy):
        raise TypeError(f"policy must be a compressm_hf.RankPolicy, got {type(policy).__name__}")
    out = LayerPlans()
    systems: dict[int, Any] = {}
    scores: dict[int, torch.Tensor] = {}
    for layer in layers:
        idx, t0 = int(layer.layer_idx), time.perf_counter()
        try:
            system = layer.lti_system()
            check_pole_margin(system)
            if target_total is not None:
                scores[idx] = rank_scores(system)
            systems[idx] = system
        except ValueError as exc:  # NaN/Inf, unstable dynamics, missing statistics ...
            _skip(layer, exc, out.skipped, step)
        out.seconds[idx] = time.perf_counter() - t0
    if target_total is not None:
        policy, out.budget = _budget_tau(policy, layers, scores, int(target_total))
        if out.budget["within_budget"]:
            return out
    for layer in layers:
        idx = int(layer.layer_idx)
        if idx not in systems:
            continue
        t0 = time.perf_counter()
        try:
            plan = plan_reduction(systems[idx], policy, layer_generator(seed, step or 0, idx))
        except ValueError as exc:
            _skip(layer, exc, out.skipped, step)
            plan = None
        if plan is not None:
            out.plans[idx] = plan
        out.seconds[idx] += time.perf_counter() - t0
    return out


def _reason(idx: int, plans: LayerPlans) -> str:
    if idx in plans.skipped:
        return f"skipped: {plans.skipped[idx]}"
    return "budget met" if plans.budget is not None and plans.budget.get("within_budget") else "gate"


def as_layer_plans(plans: LayerPlans | Mapping[int, ReductionPlan | None]) -> LayerPlans:
    """``plans`` as :class:`LayerPlans`: a plain ``{layer_idx: ReductionPlan}`` mapping (``None``: keep the layer)
    is wrapped, a ``LayerPlans`` is returned as is; anything else is a TypeError naming it."""
    if isinstance(plans, LayerPlans):
        return plans
    if isinstance(plans, Mapping):
        return LayerPlans(plans={int(k): v for k, v in plans.items() if v is not None})
    raise TypeError(
        f"plans must be a LayerPlans or a {{layer_idx: ReductionPlan}} mapping, got {type(plans).__name__}"
    )


@torch.no_grad()
def apply_plans(layers: Sequence[torch.nn.Module], plans: LayerPlans) -> tuple[list, list[dict]]:
    """``layer.reduce_(plan)`` for every planned layer; ``(swaps, one record per layer)``.

    A plan whose rank is not below the layer's size is not applied (``reason: "gate"``). A replaced
    parameter keeps the ``requires_grad`` of the one it replaces (frozen stays frozen, e.g. under peft).

    Raises:
        RuntimeError: a layer's ``reduce_`` left another state size than its plan asked for.
    """
    swaps: list = []
    records: list[dict] = []
    for layer in layers:
        idx, n = int(layer.layer_idx), int(layer.state_size)
        plan = plans.plans.get(idx)
        record = {"layer_idx": idx, "n_before": n, "n_after": n, "reduced": False}
        dt = float(plans.seconds.get(idx, 0.0))
        if plan is None or int(plan.rank) >= n:
            record["reason"] = _reason(idx, plans)
        else:
            t0 = time.perf_counter()
            layer_swaps = [as_param_swap(swap) for swap in layer.reduce_(plan)]
            for swap in layer_swaps:
                if swap.new.requires_grad != swap.old.requires_grad:
                    swap.new.requires_grad_(swap.old.requires_grad)
            swaps.extend(layer_swaps)
            dt += time.perf_counter() - t0
            if int(layer.state_size) != int(plan.rank):
                raise RuntimeError(
                    f"{type(layer).__name__} (layer {idx}) reduce_ left {layer.state_size} states, "
                    f"the plan asked for {plan.rank}"
                )
            record.update(plan_record(plan, layer.state_size))
        record["wall_time_s"] = dt
        records.append(record)
    return swaps, records


def check_state_sizes(model: torch.nn.Module, layers: Sequence[torch.nn.Module] | None = None) -> list[int]:
    """The layers' state sizes (``layer_idx`` order), after checking ``model.config.state_sizes`` agrees.

    The mixer that changes its size records it (``reduce_`` / ``resize_``); nothing else writes
    ``config.state_sizes``. A model without a config or without ``state_sizes`` is not checked.

    Raises:
        StateSizeMismatchError: a layer's ``state_size`` differs from its ``config.state_sizes`` entry.
    """
    layers = find_reducible_layers(model) if layers is None else list(layers)
    sizes = [int(layer.state_size) for layer in layers]
    recorded = getattr(getattr(model, "config", None), "state_sizes", None)
    if recorded is None:
        return sizes
    recorded = list(recorded)
    for layer in layers:
        idx = int(layer.layer_idx)
        if idx < len(recorded) and int(recorded[idx]) != int(layer.state_size):
            raise StateSizeMismatchError(
                f"{type(layer).__name__} (layer {idx}) has {layer.state_size} states but config.state_sizes[{idx}] "
                f"is {recorded[idx]}: a layer that changes its size (reduce_ / resize_) must record it in "
                "config.state_sizes"
            )
    return sizes


def record_compression(model: torch.nn.Module, record: Mapping[str, Any]) -> None:
    """Store ``record`` as ``model.config.compression`` (the one writer of that field; no-op without a config)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.compression = dict(record)


def compress_model(
    model: torch.nn.Module,
    policy: RankPolicy | None = None,
    *,
    plans: LayerPlans | Mapping[int, ReductionPlan] | None = None,
    seed: int = 0,
    step: int | None = None,
    target_total: int | None = None,
) -> CompressionEvent:
    """Shrink every reducible layer of ``model`` in place: plan (unless ``plans`` is given), apply, check.

    Args:
        model: any ``nn.Module`` holding :class:`~compressm_hf.ReducibleSSM` layers (wrappers included).
        policy: the rank policy to plan with (not needed with ``plans``).
        plans: decisions made elsewhere: a :class:`LayerPlans` (e.g. rank 0's, broadcast) or a plain
            ``{layer_idx: ReductionPlan}`` (the baselines' own plans).
        seed, step, target_total: see :func:`plan_layers`.

    Returns:
        :class:`CompressionEvent` (the optimizer state is the caller's: transplant ``event.swaps``).

    Raises:
        ValueError: neither ``policy`` nor ``plans`` given.
        StateSizeMismatchError: a layer did not record its new size in ``config.state_sizes``.
    """
    t0 = time.perf_counter()
    layers = find_reducible_layers(model)
    if plans is None:
        if policy is None:
            raise ValueError(
                "compress_model needs a RankPolicy (policy=...) or the plans (plans=...), got neither"
            )
        plans = plan_layers(layers, policy, seed=seed, step=step, target_total=target_total)
    else:
        plans = as_layer_plans(plans)
    sizes_before = [int(layer.state_size) for layer in layers]
    swaps, records = apply_plans(layers, plans)
    sizes_after = check_state_sizes(model, layers)
    return CompressionEvent(
        swaps=swaps,
        layers=records,
        sizes_before=sizes_before,
        sizes_after=sizes_after,
        skipped=dict(plans.skipped),
        budget=plans.budget,
        wall_time_s=time.perf_counter() - t0,
    )
