"""Baseline 4: gradient-informed pruning of SSM states during training.

A first-order (Taylor / "|grad x weight|", Molchanov et al. 2017) saliency per state: after gradient clipping and
before every optimizer step, ``sum |g * p|`` over all the entries of that state's parameters (for an LRU state
``i``: ``nu_log[i]``, ``theta_log[i]``, ``gamma_log[i]``, row ``i`` of ``B_re/B_im``, column ``i`` of
``C_re/C_im``) is added to a running score. Every ``every`` optimizer steps inside ``window`` the lowest-scoring
states are removed (a modal plan with ``keep``: exact slices, so the AdamW moments follow by index through
:func:`~compressm_hf.trainer.surgery.transplant_optimizer_state`), on a linear schedule that reaches the target
sizes at the last event. Scores restart after each event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from compressm_hf.protocol import find_reducible_layers

from ._common import as_sizes, modal_plan, per_state_sum, reduce_layers_


def state_saliency(layer: torch.nn.Module) -> torch.Tensor | None:
    """``(n,)`` float64 ``sum |grad * param|`` per state of one layer (``None`` when no gradient is present).

    LRU: ``nu_log``, ``theta_log``, ``gamma_log``, rows of ``B_re/B_im``, columns of ``C_re/C_im``; Mamba:
    ``A_log`` columns and the ``B``/``C`` rows of ``x_proj`` (see ``_common.per_state_sum``).
    """

    def value(p):
        return None if p.grad is None else (p.grad.detach() * p.detach()).abs()

    return per_state_sum(layer, value)


class GradientPruningCallback(TrainerCallback):
    """Prune SSM states by accumulated ``|grad x param|`` during training (works with the stock Trainer).

    Args:
        target: final sizes -- a list (one per reducible layer), an int (every layer) or a float in (0, 1]
            (fraction of each layer's initial size kept).
        every: optimizer steps between pruning events (``k``).
        window: ``(start, end)`` fractions of ``max_steps`` inside which events happen; the target is reached
            at the last event (default ``(0.0, 0.5)``).
        optimizer_state: ``"slice"`` (carry AdamW moments by index) or ``"reset"``.

    ``self.events`` lists ``{"step", "sizes_before", "sizes_after"}``.
    """

    def __init__(
        self,
        target: int | float | Sequence[int],
        every: int = 10,
        window: Sequence[float] = (0.0, 0.5),
        optimizer_state: str = "slice",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        start, end = (float(w) for w in window)
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start < end <= 1, got {tuple(window)}")
        self.target = target
        self.every = every
        self.window = (start, end)
        self.optimizer_state = optimizer_state
        self.events: list[dict] = []
        self._scores: dict[int, torch.Tensor] = {}
        self._initial: list[int] | None = None
        self._targets: list[int] | None = None
        self._steps: list[int] = []

    def event_steps(self, max_steps: int) -> list[int]:
        lo = max(1, math.ceil(self.window[0] * max_steps))
        hi = max(lo, math.floor(self.window[1] * max_steps))
        steps = [s for s in range(lo, hi + 1) if s % self.every == 0]
        return steps or [hi]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = find_reducible_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no reducible SSM layer to prune")
        self._initial = [int(layer.state_size) for layer in layers]
        self._targets = as_sizes(self.target, self._initial)
        self._steps = self.event_steps(int(state.max_steps))
        self._scores = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for layer in find_reducible_layers(model):
            s = state_saliency(layer)
            if s is None:
                continue
            idx = int(layer.layer_idx)
            prev = self._scores.get(idx)
            self._scores[idx] = s if prev is None or prev.shape != s.shape else prev + s

    def _sizes_at(self, event_no: int) -> list[int]:
        total = len(self._steps)
        frac = (event_no + 1) / total
        return [max(t, round(n0 - (n0 - t) * frac)) for n0, t in zip(self._initial, self._targets)]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        if step not in self._steps:
            return
        want = self._sizes_at(self._steps.index(step))
        layers = find_reducible_layers(model)
        before = [int(layer.state_size) for layer in layers]
        plans = {}
        for layer, size in zip(layers, want):
            n = int(layer.state_size)
            if size >= n:
                continue
            scores = self._scores.get(int(layer.layer_idx))
            if scores is None or scores.numel() != n:
                scores = torch.ones(n, dtype=torch.float64)  # no gradient seen: keep the leading states
                scores = scores - torch.arange(n, dtype=torch.float64) * 1e-9
            plans[int(layer.layer_idx)] = modal_plan(scores, size)
        if plans:
            reduce_layers_(model, plans, optimizer=optimizer, optimizer_state=self.optimizer_state)
        self._scores = {}
        after = [int(layer.state_size) for layer in find_reducible_layers(model)]
        self.events.append({"step": step, "sizes_before": before, "sizes_after": after})
