"""Helpers shared by the CompreSSM LRU, Mamba and Mamba-2 modeling files (one source, imported by all three).

``modeling/mamba2/modeling_common.py`` and ``modeling/lru/modeling_common.py`` are symbolic links to this file:
a modeling file copied next to a saved model for ``trust_remote_code`` may only import same-folder modules, so
each model folder needs the file beside it, and ``save_pretrained`` copies its content. Imports only torch and
the standard library, so the records of ``compressm_hf.protocol`` that a mixer hands out (:class:`ParamSwap`,
:class:`_LocalLTISystem`) are forced copies here, each marked ``# Copied from`` and checked by
``tests/test_copies.py``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "Conv1dAdapterGuard",
    "ShardedSaveMixin",
    "MissingStatisticsError",
    "NonUniformStateSizesError",
    "ParamSwap",
    "UnsupportedAdapterError",
]


# Copied from compressm_hf.protocol.ParamSwap
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


# Copied from compressm_hf.protocol.LTISystem with LTISystem->_LocalLTISystem, ReductionKind->str
@dataclass
class _LocalLTISystem:
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
    reduction: str = "balanced"
    surrogate: str | None = None

    @property
    def state_size(self) -> int:
        return int(self.A.shape[-1])


class MissingStatisticsError(ValueError):
    """``lti_system()`` was called before any statistics were collected."""


class UnsupportedAdapterError(ValueError):
    """An adapter (e.g. LoRA) sits on a module whose weights the mixer reads directly, or on a module
    a reduction cannot slice."""


class NonUniformStateSizesError(ValueError):
    """A model whose layers have different state sizes cannot be exported to a stock (one-size) checkpoint."""


class ReducibleMixersMixin:
    """``mixers()`` and ``set_collect_statistics()`` of a causal LM whose layers are ``self.backbone.layers``
    with a ``.mixer`` each (Mamba and Mamba-2)."""

    def mixers(self) -> list[nn.Module]:
        """The reducible mixers, in layer order."""
        return [layer.mixer for layer in self.backbone.layers]

    def set_collect_statistics(self, enabled: bool = True) -> None:
        """Switch statistics collection on or off in every layer."""
        for m in self.mixers():
            m.collect_statistics = bool(enabled)


def unsharded_class(cls: type) -> type:
    """The class FSDP2's ``fully_shard`` derived ``cls`` from (``FSDP<Class>`` -> ``<Class>``), else ``cls``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


@contextlib.contextmanager
def as_unsharded_class(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` as an instance of :func:`unsharded_class` for the time of the block (its parameters stay as
    they are)."""
    sharded_cls = type(module)
    module.__class__ = unsharded_class(sharded_cls)
    try:
        yield module
    finally:
        module.__class__ = sharded_cls


class ShardedSaveMixin:
    """``save_pretrained`` of a model sharded in place by FSDP2 records the model's own class.

    ``fully_shard`` makes the instance an ``FSDP<Class>`` built in torch's ``_fsdp_init``; ``save_pretrained`` would
    write ``_fsdp_init.FSDP<Class>`` into the config's ``auto_map`` and copy torch's FSDP sources next to the weights,
    so the folder would not load with ``trust_remote_code``. transformers' Trainer saves this way under FSDP2 with a
    full state dict (``save_pretrained(state_dict=...)`` on ``self.model``, the sharded instance).
    """

    def save_pretrained(self, *args, **kwargs):
        with as_unsharded_class(self):
            return super().save_pretrained(*args, **kwargs)


def _is_plain(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and not hasattr(module, "base_layer")


def _is_modules_to_save(module: nn.Module) -> bool:
    """peft's ``ModulesToSaveWrapper`` (duck-typed: peft is optional)."""
    return hasattr(module, "original_module") and isinstance(
        getattr(module, "modules_to_save", None), nn.ModuleDict
    )


class Conv1dAdapterGuard:
    """Mixin for a mixer that passes ``conv1d.weight`` straight to the causal-convolution kernel.

    An adapter wrapping ``conv1d`` (e.g. LoRA ``target_modules=["conv1d"]``) would be silently ignored there,
    so injecting one raises :class:`UnsupportedAdapterError` (peft injects with ``setattr(parent, name,
    wrapper)``); forwards call :meth:`_check_conv1d` as a backstop. peft's ``modules_to_save=["conv1d"]`` is
    allowed: its wrapper forwards ``.weight`` / ``.bias`` to the trainable copy.

    Class attributes: ``supported_adapter_targets`` (named in the error) and ``adapter_targets_note``
    (appended to that list, e.g. ``" (lm_head is tied to embeddings)"``). Needs ``self.layer_idx``.
    """

    supported_adapter_targets: tuple[str, ...] = ()
    adapter_targets_note: str = ""

    def __setattr__(self, name, value):
        if (
            name == "conv1d"
            and isinstance(value, nn.Module)
            and "conv1d" in self.__dict__.get("_modules", {})
        ):
            self._check_conv1d(value)
        super().__setattr__(name, value)

    def _check_conv1d(self, module: nn.Module) -> None:
        if _is_modules_to_save(module) and isinstance(module.original_module, nn.Conv1d):
            return
        if not _is_plain(module, nn.Conv1d):
            raise UnsupportedAdapterError(
                f"Module 'conv1d' of layer {self.layer_idx} cannot be wrapped ({type(module).__module__}."
                f"{type(module).__name__}): {type(self).__name__} passes conv1d.weight directly to the causal "
                f"convolution kernel, so an adapter there would be silently ignored. Adapter targets that "
                f"train: {', '.join(self.supported_adapter_targets)}{self.adapter_targets_note}."
            )


def _one_cache(cache, cache_params):
    """The cache passed under either name (``cache`` since transformers 5.24, ``cache_params`` before)."""
    if cache is not None and cache_params is not None and cache is not cache_params:
        raise ValueError("Pass the recurrent cache once, as `cache` (or the older `cache_params`), not both.")
    return cache if cache is not None else cache_params


def _accept_both_cache_names(parent_forward):
    """Wrap transformers' ``MambaModel.forward`` / ``MambaForCausalLM.forward`` so that it takes the cache
    as ``cache`` or as ``cache_params`` whatever the installed transformers calls it (5.24 renamed
    ``cache_params`` to ``cache``; 5.23 silently ignores an unknown ``cache=``). The wrapper's signature is
    the parent's plus the other name, so ``generate()``'s keyword validation still sees every argument."""
    signature = inspect.signature(parent_forward)
    native = "cache" if "cache" in signature.parameters else "cache_params"
    other = "cache_params" if native == "cache" else "cache"

    @functools.wraps(parent_forward)
    def forward(self, *args, **kwargs):
        if other in kwargs:
            kwargs[native] = _one_cache(kwargs.pop(native, None), kwargs.pop(other))
        return parent_forward(self, *args, **kwargs)

    params = list(signature.parameters.values())
    extra = inspect.Parameter(other, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    forward.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])
    return forward


def _make_lti_system(A, B, C, surrogate, diagonal: bool = True, reduction: str = "modal"):
    """``compressm_hf.LTISystem`` when the package is importable, else :class:`_LocalLTISystem` (same fields)."""
    try:
        from compressm_hf.protocol import LTISystem
    except ImportError:  # trust_remote_code without compressm_hf installed
        LTISystem = _LocalLTISystem
    return LTISystem(A=A, B=B, C=C, diagonal=diagonal, reduction=reduction, surrogate=surrogate)


def _checked_keep(keep, n: int, rank: int, where: str, groups: int | None = None) -> torch.Tensor:
    """``plan.keep`` of a subset-keeping reduction, validated against a layer of ``n`` states.

    Args:
        keep: the indices of the states to keep (tensor or sequence of ints): ``(rank,)``, or with ``groups``
            ``(groups, rank)`` (one keep-set per group) or ``(rank,)`` (the same states in every group).
        n: the layer's current state size (per group).
        rank: ``plan.rank``, the new state size.
        where: the layer, as named in the errors (e.g. ``"Mamba layer 3"``).
        groups: the number of state groups, or ``None`` for a layer with one set of states.

    Returns:
        A new CPU int64 tensor: ``(rank,)``, or ``(groups, rank)`` when ``groups`` is given.

    Raises:
        ValueError: (naming ``where``, the shape or the indices) when ``keep`` does not have that shape, when
            ``rank`` is not in ``[1, n]``, or when a row holds an index outside ``[0, n)`` or twice.
    """
    keep = torch.as_tensor(keep).detach().to("cpu", torch.long).clone()
    if groups is None:
        keep, expected = keep.reshape(-1), (rank,)
    else:
        keep, expected = (keep.expand(groups, -1) if keep.ndim == 1 else keep), (groups, rank)
    if tuple(keep.shape) != expected or not 1 <= rank <= n:
        raise ValueError(
            f"{where}: plan.keep has shape {tuple(keep.shape)} but needs {expected} for plan.rank={rank}, "
            f"with 1 <= rank <= n={n}."
        )
    rows = keep.reshape(-1, rank)
    if int(keep.min()) < 0 or int(keep.max()) >= n or any(row.unique().numel() != rank for row in rows):
        per_group = " per group" if groups is not None else ""
        raise ValueError(
            f"{where}: plan.keep={keep.tolist()} must hold {rank} distinct indices in [0, {n}){per_group}."
        )
    return keep


# keys of a CompreSSM config that a stock transformers config does not have (or must not inherit)
_COMPRESSM_ONLY_CONFIG_KEYS = (
    "state_sizes",
    "compression",
    "auto_map",
    "architectures",
    "model_type",
    "transformers_version",
)


def _refuse_adapters(model: nn.Module, what: str) -> None:
    """Raise :class:`UnsupportedAdapterError` if any module of ``model`` is wrapped by an adapter."""
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "base_layer")]
    if wrapped:
        raise UnsupportedAdapterError(
            f"{what}: modules {wrapped[:4]} carry adapters; merge them first (peft: merge_and_unload())."
        )


@torch.no_grad()
def _save_as_stock(
    model,
    state_dict,
    stock_model_class,
    stock_config_class,
    state_size,
    save_directory,
    drop=(),
    **save_kwargs,
):
    """Save ``state_dict`` as a stock transformers checkpoint of ``stock_model_class``.

    The stock config takes every field of ``model.config`` except the CompreSSM-only ones and ``drop``,
    with ``state_size`` set; the weights are loaded strictly (every key and shape must match the stock
    model). Returns the stock config written.
    """
    skip = _COMPRESSM_ONLY_CONFIG_KEYS + tuple(drop)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    fields["state_size"] = int(state_size)
    stock_config = stock_config_class(**fields)
    stock_config.architectures = [stock_model_class.__name__]
    with torch.device("meta"):
        stock = stock_model_class(stock_config)
    stock.load_state_dict(state_dict, strict=True, assign=True)
    stock.tie_weights()
    stock.generation_config = copy.deepcopy(model.generation_config)
    stock.save_pretrained(save_directory, **save_kwargs)
    return stock_config
