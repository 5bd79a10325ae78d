"""A state budget in training: its total, and the plan of each attempt that moves towards it.

``CompreSSMConfig(target_total_state=...)`` (or ``target_mean_state``) asks for a total state size instead of a
``tau``. :func:`budget_total` turns the settings into that total at ``on_train_begin`` (and refuses one the
rank policy cannot reach); :func:`plan_attempt` plans one attempt: its target comes from
:func:`compressm_hf.budget.attempt_targets` (``budget_schedule``: geometric or direct) and the engine finds the
one ``tau`` shared by every layer that meets it (:func:`compressm_hf.engine.plan_layers`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from compressm_hf.budget import attempt_targets, budget_from_mean, minimum_total
from compressm_hf.engine import LayerPlans, plan_layers
from compressm_hf.settings import CompreSSMConfig

__all__ = ["budget_total", "plan_attempt"]


def budget_total(
    config: CompreSSMConfig, sizes: list[int], original_sizes: list[int] | None = None
) -> int | None:
    """The state budget of ``config`` as a total over layers of ``sizes``; None without a budget.

    Args:
        config: the run's settings.
        sizes: the layers' current state sizes.
        original_sizes: the sizes the run started from (a resumed run); default ``sizes``.

    Raises:
        ValueError: the budget is below what ``min_state_size`` / ``round_to`` / ``gate`` allow
            (:func:`~compressm_hf.budget.minimum_total`).

    Warns:
        UserWarning: the budget is not below the model's total state size (nothing will be cut).
    """
    if config.target_total_state is None and config.target_mean_state is None:
        return None
    if config.target_total_state is not None:
        total, asked = config.target_total_state, f"target_total_state={config.target_total_state}"
    else:
        total = budget_from_mean(config.target_mean_state, len(sizes))
        asked = f"target_mean_state={config.target_mean_state} (a total of {total} over {len(sizes)} layers)"
    floor = minimum_total(sizes, config.policy())
    if total < floor:
        raise ValueError(
            f"the state budget {asked} is unreachable: with min_state_size={config.min_state_size}, "
            f"round_to={config.round_to} and gate={config.gate}, the {len(sizes)} layers of sizes {sizes} cannot go "
            f"below a total of {floor}; raise the budget or lower min_state_size / round_to"
        )
    original = list(original_sizes or sizes)
    if total >= sum(original):
        warnings.warn(
            f"CompreSSM: the state budget {total} is not below the model's total state size {sum(original)} "
            f"(sizes {original}): nothing will be cut",
            stacklevel=3,
        )
    return total


def plan_attempt(
    layers: Sequence[torch.nn.Module],
    config: CompreSSMConfig,
    *,
    step: int,
    steps: Sequence[int],
    total: int,
    original_total: int,
) -> LayerPlans:
    """The plans of the attempt at ``step`` under the budget ``total`` (from :func:`budget_total`).

    Attempt ``k`` of the ``len(steps)`` scheduled ones aims at ``attempt_targets(...)[k - 1]`` (a step outside
    the schedule counts as the last attempt). The plans' ``budget`` record gains ``target_total_state``,
    ``schedule``, ``attempt`` and ``attempts``.

    Warns:
        UserWarning: the attempt's target cannot be reached (the cut goes as far as the policy allows).
    """
    attempt = list(steps).index(step) + 1 if step in steps else len(steps)
    attempts = max(1, len(steps))
    target = attempt_targets(original_total, total, attempts, config.budget_schedule)[attempt - 1]
    plans = plan_layers(layers, config.policy(), seed=config.seed, step=step, target_total=target)
    plans.budget = {
        "target_total_state": total,
        "schedule": config.budget_schedule,
        "attempt": attempt,
        "attempts": attempts,
        **plans.budget,
    }
    if not plans.budget.get("met", True):
        warnings.warn(
            f"CompreSSM step {step}: attempt {attempt}/{attempts} aims at a total state size of {target} but "
            f"can reach only {plans.budget['planned_total']} (min_state_size={config.min_state_size}, round_to="
            f"{config.round_to}, gate={config.gate}, {len(plans.skipped)} layer(s) skipped); cutting as far "
            "as allowed",
            stacklevel=4,
        )
    return plans
