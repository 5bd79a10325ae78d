"""Shared helpers of the baselines: LRU state parameters, differentiable systems, modal cuts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compressm_hf.engine import compress_model
from compressm_hf.modeling.lru.modeling_lru import _STATE_PARAMS as LRU_STATE_PARAMS
from compressm_hf.protocol import ReductionPlan


def is_lru_mixer(module: torch.nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.nn.Parameter) for name in LRU_STATE_PARAMS)


def state_params(layer: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """``name -> (parameter, state_axis)`` of one reducible layer.

    LRU mixers: the seven state parameters. Other layers (Mamba): every parameter with an axis of length
    ``state_size`` (``A_log`` ``(d_inner, n)`` ...); a layer may override this with a ``state_parameters()``
    method returning the same mapping.
    """
    custom = getattr(layer, "state_parameters", None)
    if callable(custom):
        return dict(custom())
    if is_lru_mixer(layer):
        return {name: (getattr(layer, name), dim) for name, dim in LRU_STATE_PARAMS.items()}
    n = int(layer.state_size)
    out = {}
    for name, p in layer.named_parameters(recurse=False):
        dims = [d for d, s in enumerate(p.shape) if s == n]
        if dims:
            out[name] = (p, dims[-1])
    return out


def differentiable_lru_system(mixer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lambda (n,), B (n, H), C (H, n))`` in complex128 built from the LRU parameters **with** autograd.

    ``LRUMixer.lti_system()`` runs under ``torch.no_grad`` and detaches (it is the input of a reduction
    decision), so a regularizer cannot use it: this rebuilds the same system from ``nu_log``, ``theta_log``,
    ``gamma_log``, ``B_re/B_im`` and ``C_re/C_im`` so that gradients flow back to all of them.
    """
    nu = mixer.nu_log.to(torch.float64)
    theta = mixer.theta_log.to(torch.float64)
    lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
    gamma = torch.exp(mixer.gamma_log.to(torch.float64))[:, None]
    B = torch.complex(mixer.B_re.to(torch.float64) * gamma, mixer.B_im.to(torch.float64) * gamma)
    C = torch.complex(mixer.C_re.to(torch.float64), mixer.C_im.to(torch.float64))
    return lam, B, C


def modal_plan(scores: torch.Tensor, rank: int) -> ReductionPlan:
    """A modal :class:`ReductionPlan` keeping the ``rank`` highest-scoring states (sorted indices)."""
    scores = scores.detach().to(torch.float64).cpu()
    n = int(scores.numel())
    rank = int(max(1, min(rank, n)))
    keep = torch.topk(scores, rank).indices.sort().values
    total = float(scores.sum())
    kept = float(scores[keep].sum())
    return ReductionPlan(
        n=n,
        rank=rank,
        hsv=scores.sort(descending=True).values,
        energy_kept=kept / total if total > 0 else 1.0,
        error_bound=float("nan"),
        rule="modal",
        selection="largest",
        keep=keep,
    )


def reduce_layers_(
    model: torch.nn.Module,
    plans: dict[int, ReductionPlan],
    optimizer=None,
    optimizer_state: str = "slice",
) -> list:
    """Apply ``plans`` (``layer_idx -> plan``) through :func:`compressm_hf.engine.compress_model` and carry the
    optimizer state; returns the parameter swaps (the layers record their sizes in ``config.state_sizes``)."""
    from ..surgery import transplant_optimizer_state

    swaps = compress_model(model, plans=plans).swaps
    if swaps and optimizer is not None:
        transplant_optimizer_state(optimizer, swaps, optimizer_state)
    return swaps


def as_sizes(target: int | float | Sequence[int], current: Sequence[int]) -> list[int]:
    """Per-layer target sizes from an int (every layer), a float in (0, 1] (fraction kept) or a list."""
    if isinstance(target, bool):
        raise ValueError(f"target must be sizes, an int or a fraction, got {target!r}")
    if isinstance(target, float):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"a fractional target must be in (0, 1], got {target}")
        return [max(1, round(target * n)) for n in current]
    if isinstance(target, int):
        return [min(int(target), n) for n in current]
    sizes = [int(s) for s in target]
    if len(sizes) != len(current):
        raise ValueError(f"target has {len(sizes)} sizes for {len(current)} reducible layers: {sizes}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"target sizes must be >= 1, got {sizes}")
    return sizes


def per_state_sum(layer: torch.nn.Module, value) -> torch.Tensor | None:
    """``(n,)`` float64: ``value(param)`` (elementwise, same shape as ``param``, or ``None`` to skip it) summed
    over every entry that belongs to each state.

    The entries are those of :func:`state_params` along their state axis, plus, for Mamba mixers, the rows of
    ``x_proj`` that produce ``B_i`` and ``C_i`` (``time_step_rank + i`` and ``time_step_rank + n + i``).
    Returns ``None`` when ``value`` skipped every parameter.
    """
    n = int(layer.state_size)
    total = torch.zeros(n, dtype=torch.float64)
    seen = False
    for p, dim in state_params(layer).values():
        v = value(p)
        if v is None:
            continue
        seen = True
        v = v.detach().to(torch.float64)
        dims = [d for d in range(v.dim()) if d != dim % v.dim()]
        total += (v.sum(dim=dims) if dims else v).cpu()
    x_proj, rank = getattr(layer, "x_proj", None), getattr(layer, "time_step_rank", None)
    weight = getattr(x_proj, "weight", None)
    if isinstance(weight, torch.Tensor) and rank is not None and weight.shape[0] == int(rank) + 2 * n:
        v = value(weight)
        if v is not None:
            seen = True
            v = v.detach().to(torch.float64).flatten(1).sum(1).cpu()
            r = int(rank)
            total += v[r : r + n] + v[r + n : r + 2 * n]
    return total if seen else None
