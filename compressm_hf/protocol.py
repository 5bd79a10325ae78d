"""The reduction protocol: the seam between the control-theory core, the models and the callback.

The core (`compressm_hf`) never learns what an ``A_log`` or a ``nu_log`` is, and the models never
learn how a rank is chosen. They meet through three small records defined here:

* :class:`LTISystem` -- what a reducible layer hands out: the linear system ``(A, B, C)`` whose
  Gramians decide which states matter (for selective layers: an averaged LTI surrogate), and which
  kind of reduction the layer can absorb (``"balanced"``, ``"modal"`` or ``"grouped"``).
* :class:`ReductionPlan` -- what the core hands back (see :func:`compressm_hf.plan_reduction`):
  the new rank and either a re-diagonalized reduced system (balanced truncation) or the indices of
  the diagonal states to keep (modal truncation).
* :class:`ParamSwap` -- what a layer reports after shrinking itself: every parameter it replaced,
  so that the optimizer state can follow (see :mod:`compressm_hf.trainer.surgery`).

A reducible layer is any ``nn.Module`` that implements :class:`ReducibleSSM`; the callback finds
them with :func:`find_reducible_layers`. Modeling files duck-type these records (they must stay
importable without ``compressm_hf`` for ``trust_remote_code`` loading), so every field here is a
plain tensor, number or string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch

ReductionKind = Literal["balanced", "modal", "grouped"]


@dataclass
class LTISystem:
    """A discrete linear time-invariant system ``x[k+1] = A x[k] + B u[k]``, ``y[k] = C x[k]``.

    Attributes:
        A: ``(..., n)`` diagonal of ``A`` when ``diagonal`` is True, else ``(..., n, n)``.
            Real (float64) or complex (complex128). Leading dimensions are independent systems
            (e.g. one SISO system per Mamba channel).
        B: ``(..., n, m)`` input matrix, same dtype family as ``A``.
        C: ``(..., p, n)`` output matrix.
        diagonal: whether ``A`` holds only the diagonal.
        reduction: which reduction the owning layer can absorb. ``"balanced"``: any reduced
            system (the layer re-diagonalizes it, e.g. LRU). ``"modal"``: only a subset of its
            own diagonal states (e.g. Mamba, whose kernels need the shared diagonal ``A``).
            ``"grouped"``: a subset of state channels per group, chosen by Hankel importance summed
            over the group's heads (Mamba-2: dense per-head Gramians, see :mod:`compressm_hf.grouped`).
        surrogate: short description when the system is an averaged surrogate of a selective
            layer (e.g. ``"mean-dt, E[B^2], E[C^2] over 12288 tokens"``); ``None`` for exact LTI.
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    diagonal: bool = True
    reduction: ReductionKind = "balanced"
    surrogate: str | None = None

    @property
    def state_size(self) -> int:
        return int(self.A.shape[-1])


@dataclass
class ReductionPlan:
    """A decision to shrink one layer from ``n`` to ``rank`` states.

    Attributes:
        n: current state size.
        rank: new state size (``1 <= rank < n``).
        hsv: ``(n,)`` float64 Hankel singular values (for modal layers: the per-state importance
            scores that played their role), sorted descending.
        energy_kept: ``sum(hsv[:rank]) / sum(hsv)`` of the states actually kept.
        error_bound: ``2 * sum`` of the discarded values (the H-infinity bound for balanced
            truncation of an exact LTI system; a heuristic for surrogates).
        rule: ``"balanced"`` or ``"modal"``.
        selection: ``"largest"``, ``"smallest"`` or ``"random"``.
        keep: ``(rank,)`` int64 indices of the original diagonal states kept (modal plans, and
            the ``random`` selection of balanced layers); ``None`` for balanced plans.
        diagonal: for balanced plans, the re-diagonalized reduced system: ``diagonal.A`` is
            ``(rank,)`` complex eigenvalues with ``|lambda| < 1``, ``diagonal.B`` ``(rank, m)``,
            ``diagonal.C`` ``(p, rank)``. ``None`` for modal plans.
        extra: free-form numbers for the report (e.g. the eigenvalue clamps that fired).
    """

    n: int
    rank: int
    hsv: torch.Tensor
    energy_kept: float
    error_bound: float
    rule: ReductionKind
    selection: str = "largest"
    keep: torch.Tensor | None = None
    diagonal: LTISystem | None = None
    extra: dict = field(default_factory=dict)


class ParamSwap(NamedTuple):
    """One parameter replaced by a layer's ``reduce_``.

    Attributes:
        old: the parameter that was removed from the module.
        new: the parameter that replaced it (a new ``nn.Parameter`` object).
        state_dim: the axis of ``old``/``new`` that indexes states, or ``None`` if the shape did
            not change along a state axis (the optimizer state is then copied when shapes match).
        keep: ``(new.shape[state_dim],)`` int64 indices into ``old`` along ``state_dim`` when every
            new slice is a copy of an old one (modal truncation; for Mamba's ``x_proj`` the kept
            rows ``dt | B[keep] | C[keep]``). ``None`` when the state coordinates changed
            (balanced truncation): there is no correspondence, and the optimizer-state policy
            decides between slicing the leading entries and resetting.
    """

    old: torch.nn.Parameter
    new: torch.nn.Parameter
    state_dim: int | None
    keep: torch.Tensor | None


def as_param_swap(swap) -> ParamSwap:
    """``swap`` as this :class:`ParamSwap`: the one way swaps are read.

    A layer returns ``ParamSwap`` from its own modeling file (a copy of this class for ``trust_remote_code``,
    so another type) or any ``(old, new, state_dim, keep)`` 4-tuple; all become a ``ParamSwap`` here.

    Raises:
        TypeError: ``swap`` does not have the four fields.
    """
    try:
        old, new, state_dim, keep = swap
    except (TypeError, ValueError):
        raise TypeError(
            f"a reduce_ swap must be a ParamSwap or an (old, new, state_dim, keep) tuple, got {swap!r}"
        ) from None
    return ParamSwap(old, new, state_dim, keep)


@runtime_checkable
class ReducibleSSM(Protocol):
    """What a compressible SSM mixer implements: ``lti_system``, ``reduce_`` and ``resize_``.

    ``isinstance(mixer, ReducibleSSM)`` checks that every member is there (not the signatures; the
    tests check those for every mixer in the package).

    Attributes:
        layer_idx: index of the layer in ``config.state_sizes``.
        state_size: current number of states ``n``.
    """

    layer_idx: int
    state_size: int

    def lti_system(self) -> LTISystem:
        """The system the Gramians are computed from (float64/complex128, no grad)."""
        ...

    def reduce_(self, plan: ReductionPlan) -> list[ParamSwap]:
        """Shrink in place to ``plan.rank`` states; return every parameter replaced."""
        ...

    def resize_(self, state_size: int) -> None:
        """Reallocate the layer in place at ``state_size`` states (larger or smaller) and update
        ``config.state_sizes[layer_idx]``.

        The values of the states are unspecified (each mixer documents what it keeps, e.g. the leading
        states); they are meant to be overwritten. Used to load a checkpoint written after a reduction
        into a model built at its original size, and by pragmatic rollback to undo a cut.

        Raises:
            ValueError: ``state_size < 1``.
        """
        ...


def find_reducible_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """All modules of ``model`` that implement :class:`ReducibleSSM`, in ``layer_idx`` order.

    Works through wrappers (DDP, peft) because it walks ``model.modules()``.
    """
    layers = [
        m
        for m in model.modules()
        if callable(getattr(m, "lti_system", None))
        and callable(getattr(m, "reduce_", None))
        and hasattr(m, "layer_idx")
    ]
    return sorted(layers, key=lambda m: m.layer_idx)


def require_reducible_layers(model, who: str) -> list:
    """:func:`find_reducible_layers` of ``model``, or a ValueError naming ``who`` when there are none (or no
    model at all)."""
    if model is None:
        raise ValueError(f"{who} needs the model (the Trainer passes it to every event), got None")
    layers = find_reducible_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no reducible SSM layer (no module implements lti_system(), reduce_() "
            f"and layer_idx); {who} has nothing to compress"
        )
    return layers
