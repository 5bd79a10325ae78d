"""Baseline 3: Hankel-nuclear-norm regularization, then balanced truncation after training.

Forgione, Mejari & Piga (CDC 2024) and CompreSSM's Table 6 "HNN": every training step adds
``lambda * sum_layers sum_i sigma_i`` (the Hankel nuclear norm of each SSM layer) to the loss, which pushes the
Hankel singular values towards a fast-decaying spectrum; after training one balanced truncation per layer at
the chosen ``tau``, or at the shared ``tau`` that meets a total state budget (:func:`balanced_truncate_`, the
same ``plan_reduction`` + ``reduce_`` as CompreSSM, :func:`compressm_hf.budget.tau_for_budget` for the budget).

The regularizer must be differentiable through the Gramians. ``LRUMixer.lti_system()`` is built under
``torch.no_grad`` and detached, so the system is rebuilt here from the LRU parameters themselves
(:func:`~compressm_hf.trainer.baselines._common.differentiable_lru_system`) and fed to
:func:`compressm_hf.hankel_singular_values` (closed-form diagonal Gramians, Cholesky, SVD: all differentiable;
gradients reach ``nu_log``, ``theta_log``, ``gamma_log``, ``B_re/B_im``, ``C_re/C_im``). The cost is an
``n x n`` Cholesky and SVD per layer per step -- the reason the paper reports HNN ~40x slower than CompreSSM.
Only LRU layers are supported (a selective layer has no fixed system to regularize).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from compressm_hf import hankel_singular_values
from compressm_hf.budget import UnreachableBudgetError, minimum_total
from compressm_hf.engine import compress_model
from compressm_hf.protocol import find_reducible_layers
from compressm_hf.settings import CompreSSMConfig

from ..surgery import transplant_optimizer_state
from ._common import differentiable_lru_system, is_lru_mixer


def hankel_nuclear_norm(model: torch.nn.Module) -> torch.Tensor:
    """``sum over LRU layers of sum(sigma)`` as a differentiable float64 scalar."""
    layers = [m for m in find_reducible_layers(model) if is_lru_mixer(m)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LRU mixer: the Hankel-nuclear-norm regularizer needs LTI layers "
            "with nu_log/theta_log/gamma_log/B_re/B_im/C_re/C_im"
        )
    total = None
    for layer in layers:
        lam, B, C = differentiable_lru_system(layer)
        s = hankel_singular_values(lam, B, C, diagonal=True).sum()
        total = s if total is None else total + s
    return total


class HNNTrainer(Trainer):
    """A :class:`transformers.Trainer` that adds ``hnn_lambda * hankel_nuclear_norm(model)`` to the training loss
    at every step (evaluation losses are the plain task loss).

    Args:
        hnn_lambda: regularization weight (``>= 0``).
        truncate_tau: if given, :func:`balanced_truncate_` the model at this ``tau`` when training ends
            (``train()`` returns after the cut). Else call :func:`balanced_truncate_` yourself.
        truncate_budget: instead of ``truncate_tau``: cut at the shared ``tau`` whose total state size is
            the largest one ``<=`` this budget (to compare with other methods at equal total size).
        truncate_gate: gate of that final cut (default 1.0: cut whenever the rank is smaller than ``n``).

    ``self.last_hnn`` holds the last regularizer value (float) for logging.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        hnn_lambda: float = 1e-3,
        truncate_tau: float | None = None,
        truncate_gate: float = 1.0,
        truncate_budget: int | None = None,
        **kwargs,
    ):
        if not float(hnn_lambda) >= 0:
            raise ValueError(f"hnn_lambda must be >= 0, got {hnn_lambda!r}")
        if truncate_tau is not None and truncate_budget is not None:
            raise ValueError(
                f"give truncate_tau ({truncate_tau!r}) or truncate_budget ({truncate_budget!r}), not both"
            )
        super().__init__(*args, **kwargs)
        self.hnn_lambda = float(hnn_lambda)
        self.truncate_tau = truncate_tau
        self.truncate_gate = float(truncate_gate)
        self.truncate_budget = truncate_budget
        self.last_hnn: float | None = None
        self.truncation: dict | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if self.hnn_lambda > 0:
            reg = hankel_nuclear_norm(self.accelerator.unwrap_model(model))
            self.last_hnn = float(reg.detach())
            loss = loss + (self.hnn_lambda * reg).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        if self.truncate_tau is not None or self.truncate_budget is not None:
            self.truncation = balanced_truncate_(
                self.model, self.truncate_tau, budget=self.truncate_budget, gate=self.truncate_gate
            )
        return out


@torch.no_grad()
def balanced_truncate_(
    model: torch.nn.Module,
    tau: float | None = None,
    *,
    budget: int | None = None,
    gate: float = 1.0,
    min_state_size: int = 1,
    optimizer=None,
) -> dict:
    """One balanced truncation per reducible layer (``plan_reduction`` + ``reduce_``), e.g. after HNN training.

    Give ``tau`` (the per-layer rule) or ``budget``: the total state size across layers; the shared ``tau``
    is the engine's (:func:`compressm_hf.engine.compress_model` with ``target_total``: the largest total
    ``<= budget``, layers it skips counted at their size; raises
    ``UnreachableBudgetError`` below what ``min_state_size`` allows). Returns ``{"sizes_before", "sizes_after",
    "energy_kept", "tau"}``; ``config.state_sizes`` is updated.
    """
    if (tau is None) == (budget is None):
        raise ValueError(f"give exactly one of tau ({tau!r}) or budget ({budget!r})")
    policy = CompreSSMConfig(
        tau=0.0 if tau is None else tau, gate=gate, min_state_size=min_state_size
    ).policy()
    if budget is not None:  # the engine searches the shared tau (a layer it skips keeps its size and counts)
        sizes = [int(layer.state_size) for layer in find_reducible_layers(model)]
        if int(budget) < minimum_total(sizes, policy):
            raise UnreachableBudgetError(
                f"budget {budget} is below {minimum_total(sizes, policy)}, the smallest total min_state_size="
                f"{min_state_size} and gate={gate} allow for layers of sizes {sizes}"
            )
    cut = compress_model(model, policy, target_total=budget)
    if cut.swaps and optimizer is not None:
        transplant_optimizer_state(optimizer, cut.swaps, "slice")
    return {
        "sizes_before": cut.sizes_before,
        "sizes_after": cut.sizes_after,
        "energy_kept": {r["layer_idx"]: float(r["energy_kept"]) for r in cut.layers if r["reduced"]},
        "tau": policy.tau if cut.budget is None else float(cut.budget.get("tau", 0.0)),
    }
