"""Is the run healthy enough to compress? Non-finite or signal-free training is never cut.

Before planning at every attempt (and again at ``on_train_end``) :class:`HealthCheck` looks for evidence that
the model diverges or learns nothing:

* a trainable parameter holds a NaN or an Inf (the Trainer's ``logging_nan_inf_filter``, on by default,
  hides a NaN loss from the logged ``loss``/``train_loss``, but not from the weights);
* a training loss logged since the previous check is NaN/Inf (``logging_nan_inf_filter=False``);
* the gradient of the attempt's optimizer step (seen at ``on_pre_optimizer_step``, before ``zero_grad``) is
  exactly zero in every trainable parameter: the loss gives no training signal, e.g. a causal LM fed
  sequences of length 1, whose labels are all ignored (weight decay still moves the weights, so "the weights
  did not change" would not catch it);
* every training loss logged since the previous check is exactly 0.0 (attempts only).

Rank 0 decides for every rank; under FSDP2 (``DTensor`` parameters) each rank checks its own shards and the
findings of every rank are pooled first. :func:`health_entry` / :func:`warn_health` turn a finding into the report's
``"health"`` entry and a loud :class:`NonFiniteTrainingWarning`; :func:`skipped_event` is the report event of
an attempt skipped for it.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from .fsdp2 import is_fully_sharded
from .surgery import broadcast_objects, gathered_objects, is_distributed

logger = logging.getLogger(__name__)

__all__ = [
    "HealthCheck",
    "NonFiniteTrainingWarning",
    "gradient_is_zero",
    "health_entry",
    "health_message",
    "nonfinite_parameters",
    "skipped_event",
    "warn_health",
]


class NonFiniteTrainingWarning(UserWarning):
    """The training diverged (NaN/Inf parameters or losses) or learned nothing (no gradient, loss 0):
    CompreSSMCallback did not compress at that attempt (see ``on_nonfinite``)."""


def _is_real(x) -> bool:
    """An int/float (NaN and Inf included), not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _by_device(tensors):
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups.values()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2), else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def describe_names(names: list[str], limit: int = 5) -> str:
    """``"a, b, c"``, or the first ``limit`` names and ``"and k more"``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an Inf (one host sync per device)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    index = {id(p): n for n, p in named}
    bad = []
    for group in _by_device([p for _, p in named]):
        flags = torch.stack([torch.isfinite(_local(p.detach())).all() for p in group]).cpu().tolist()
        bad.extend(index[id(p)] for p, ok in zip(group, flags) if not ok)
    return bad


def gradient_is_zero(model: torch.nn.Module) -> bool:
    """True if no trainable parameter has a gradient with a nonzero (or NaN) entry."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    for group in _by_device(grads):
        if bool(torch.stack([_local(g.detach()).ne(0).any() for g in group]).any()):
            return False
    return True


class HealthCheck:
    """The health of one run, checked at the attempts and at the end (runtime state only).

    Attributes:
        checked_step: losses logged after this optimizer step are looked at by the next check.
        zero_gradient_at: attempt step -> whether its gradient was exactly zero.
    """

    def __init__(self, checked_step: int = 0) -> None:
        self.checked_step = int(checked_step)
        self.zero_gradient_at: dict[int, bool] = {}

    def note_gradient(self, step: int, model: torch.nn.Module) -> None:
        """Remember whether the gradient of the optimizer step ending at ``step`` is all zero (on every rank's
        shard, under FSDP2; every rank calls this)."""
        zero = gradient_is_zero(model)
        if is_fully_sharded(model):
            zero = all(gathered_objects(zero, f"the gradient check of step {step}"))
        self.zero_gradient_at[int(step)] = zero

    def problems(self, model: torch.nn.Module, state, at_attempt: bool) -> list[str]:
        """What says that the training diverged or learns nothing; ``[]`` if healthy (rank 0's answer)."""
        step = int(state.global_step)
        problems = []
        bad = nonfinite_parameters(model)
        if is_fully_sharded(model):  # FSDP2: a NaN may sit in another rank's shard
            found = set().union(*gathered_objects(bad, f"the parameter check of step {step}"))
            bad = [n for n, _ in model.named_parameters() if n in found]
        if bad:
            problems.append(
                f"non-finite values (NaN/Inf) in {len(bad)} trainable parameter(s): {describe_names(bad)}"
            )
        losses = [
            (int(h.get("step", step)), float(h["loss"]))
            for h in state.log_history
            if _is_real(h.get("loss")) and int(h.get("step", step)) > self.checked_step
        ]
        nonfinite = [s for s, v in losses if not math.isfinite(v)]
        if nonfinite:
            problems.append(
                f"non-finite training loss logged at step(s) {describe_names([str(s) for s in nonfinite])}"
            )
        if at_attempt:
            if self.zero_gradient_at.pop(step, False):
                problems.append(
                    "the gradient is exactly zero in every trainable parameter: the loss gives no training "
                    "signal (no targets? e.g. a causal LM fed sequences of length 1 has all labels ignored)"
                )
            if losses and all(v == 0.0 for _, v in losses):
                problems.append(
                    f"the training loss is exactly 0 at every step logged since step {self.checked_step} "
                    f"({len(losses)} entries)"
                )
        self.checked_step = step
        if is_distributed():
            (problems,) = broadcast_objects([problems], what=f"the health check of step {step}")
        return problems


def health_message(step: int, at: str, action: str, problems: list[str]) -> str:
    """The warning of a health finding (``at``: ``"attempt"``/``"train_end"``; ``action``: what was done)."""
    reason = "; ".join(problems)
    if at == "train_end":
        return (
            f"CompreSSM at the end of training (step {step}): {reason}. The trained model is broken "
            "(it diverged or learned nothing); check the data for NaN/Inf features, the learning rate and "
            "the labels"
        )
    what = (
        "stopping the training (on_nonfinite='stop')"
        if action == "stopped"
        else "training goes on (on_nonfinite='warn'); later attempts check again"
    )
    return (
        f"CompreSSM step {step}: {reason}. The model was not compressed at this attempt (it diverged or "
        f"learned nothing); {what}. Check the data for NaN/Inf features, the learning rate and the labels"
    )


def health_entry(step: int, at: str, action: str, problems: list[str]) -> dict:
    """The report's ``"health"`` entry of a finding."""
    return {"step": int(step), "at": at, "action": action, "problems": list(problems)}


def warn_health(step: int, at: str, action: str, problems: list[str]) -> None:
    """Warn loudly about a finding: an error log and a :class:`NonFiniteTrainingWarning`."""
    message = health_message(step, at, action, problems)
    logger.error(message)
    warnings.warn(message, NonFiniteTrainingWarning, stacklevel=4)


def skipped_event(state, layers, reason: str, optimizer_state: str) -> dict:
    """The report event of an attempt skipped on a broken run: no layer cut, every layer says why."""
    sizes = [int(layer.state_size) for layer in layers]
    return {
        "kind": "reduction",
        "step": int(state.global_step),
        "epoch": state.epoch,
        "skipped": reason,
        "sizes_before": sizes,
        "sizes_after": sizes,
        "layers_reduced": 0,
        "optimizer_state": optimizer_state,
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
