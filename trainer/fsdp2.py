"""One compression event on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 (each rank holds a slice), the optimizer
state (Adam's ``exp_avg`` / ``exp_avg_sq``) is sharded the same way, and each ``fully_shard`` unit keeps
an ``FSDPParamGroup`` of ``FSDPParam`` records (shard sizes, padding, all-gather buffers) built for the
parameters' shapes. :func:`compress_fully_sharded` runs a cut on such a model, in place, on every rank:

1. statistics of selective layers (Mamba's surrogate moments, sums over tokens) are summed across
   ranks in place (:func:`~compressm_hf.trainer.statistics.pool_statistics_`), so rank 0 plans on the
   statistics of every rank's batches (sums and token counts both summed);
2. for each reducible layer in turn, the layer's parameters (that layer only) are gathered to full
   tensors (``DTensor.full_tensor()``) and put on the layer for the time of the call, so that its
   ``lti_system()`` / ``reduce_()`` see plain tensors;
3. rank 0 plans (a callable given the layers, or :func:`compressm_hf.engine.plan_layers` with a
   :class:`~compressm_hf.RankPolicy`); :func:`~compressm_hf.trainer.surgery.broadcast_objects` sends
   its :class:`~compressm_hf.engine.LayerPlans` to every rank;
4. every rank applies the same plan to the same full tensors
   (:func:`~compressm_hf.engine.apply_plans`), so the new full parameters agree bit for bit; each new
   parameter is sharded again by a new ``FSDPParam`` that takes the old one's place in its group
   (:func:`_reshard_param`, the only code here that touches FSDP internals);
5. the optimizer state of every replaced parameter is gathered to full tensors, mapped by
   :func:`~compressm_hf.trainer.surgery.transplant_optimizer_state` (``"slice"``: the swap's ``keep``
   indices or the leading entries; ``"reset"``: zeros) and sharded like the new parameter; the new
   sharded parameter takes the old one's place in its optimizer group.

Nothing is rebuilt around the model: the FSDP units, their hooks, the root module and the optimizer
object stay the same, so a training loop holding references to them continues. Collectives are issued in
the same order on every rank (layers in ``layer_idx`` order, parameters in ``named_parameters`` order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from compressm_hf.engine import (
    CompressionEvent,
    LayerPlans,
    apply_plans,
    as_layer_plans,
    check_state_sizes,
    plan_layers,
)
from compressm_hf.modeling.mamba.modeling_common import as_unsharded_class
from compressm_hf.protocol import ParamSwap, as_param_swap, find_reducible_layers
from compressm_hf.rank import RankPolicy

from .statistics import pool_statistics_
from .surgery import (
    OPTIMIZER_STATE_MODES,
    base_optimizer,
    broadcast_objects,
    decided_on_rank0,
    distributed_rank,
    transplant_optimizer_state,
)

__all__ = [
    "FSDPCompressionEvent",
    "FSDPInternalsError",
    "compress_fully_sharded",
    "is_fully_sharded",
    "local_state_bytes",
    "save_pretrained_fully_sharded",
]

Plans = LayerPlans | Mapping[int, Any] | RankPolicy | Callable[[Sequence[Any]], Any]


class FSDPInternalsError(RuntimeError):
    """This torch's FSDP2 lacks the internals that re-sharding a reshaped parameter relies on."""


@dataclass
class FSDPCompressionEvent(CompressionEvent):
    """:class:`~compressm_hf.engine.CompressionEvent` of a sharded model.

    ``swaps`` hold the *sharded* parameters (``old`` / ``new`` are the ``DTensor`` parameters the optimizer
    held before and holds now). The optimizer state has already been carried (do not transplant again;
    doing so is a no-op). ``optimizer`` holds the counts of
    :func:`~compressm_hf.trainer.surgery.transplant_optimizer_state` summed over the layers.
    """

    optimizer: dict[str, int] = field(default_factory=dict)


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return None
    return FSDPModule


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was passed to ``fully_shard`` (FSDP2)."""
    cls = _fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank calls it), a plain tensor as is."""
    return t.full_tensor() if _is_dtensor(t) else t


# --------------------------------------------------------------------------------------------
# FSDP2 internals (written against torch 2.13): the one place that reads or writes them


@dataclass
class _Sharded:
    """Where one sharded parameter lives: its ``FSDPParamGroup`` and its index in ``group.fsdp_params``."""

    group: Any
    index: int

    @property
    def fsdp_param(self) -> Any:
        return self.group.fsdp_params[self.index]


def _internals():
    """``(FSDPParam, ParamModuleInfo)`` of this torch, or :class:`FSDPInternalsError`."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ParamModuleInfo
    except ImportError as exc:
        raise FSDPInternalsError(
            f"torch {torch.__version__} has no torch.distributed.fsdp._fully_shard._fsdp_param.FSDPParam / "
            "ParamModuleInfo: compressing a fully_shard model in place needs them (checked with torch 2.13); "
            "compress under DDP or a single process instead"
        ) from exc
    return FSDPParam, ParamModuleInfo


def _sharded_params(model: torch.nn.Module) -> dict[int, _Sharded]:
    """``id(sharded DTensor parameter) -> _Sharded`` for every parameter FSDP2 manages in ``model``.

    Raises:
        FSDPInternalsError: an FSDP module lacks ``_get_fsdp_state()._fsdp_param_groups[*].fsdp_params``.
    """
    cls = _fsdp_module_class()
    found: dict[int, _Sharded] = {}
    for module in model.modules():
        if cls is None or not isinstance(module, cls):
            continue
        try:
            groups = module._get_fsdp_state()._fsdp_param_groups
            for group in groups:
                for i, fsdp_param in enumerate(group.fsdp_params):
                    found[id(fsdp_param.sharded_param)] = _Sharded(group, i)
        except AttributeError as exc:
            raise FSDPInternalsError(
                f"torch {torch.__version__}: the FSDP state of {type(module).__name__} has no "
                f"_fsdp_param_groups[*].fsdp_params[*].sharded_param ({exc}); compressing a fully_shard model "
                "in place needs them (checked with torch 2.13)"
            ) from exc
    return found


def _missing(exc: AttributeError) -> FSDPInternalsError:
    return FSDPInternalsError(
        f"torch {torch.__version__}: FSDP2's FSDPParam / FSDPParamGroup lack an attribute that re-sharding a "
        f"reshaped parameter relies on ({exc}; checked with torch 2.13); compress under DDP or a single process"
    )


def _reshard_param(where: _Sharded, new: torch.nn.Parameter) -> torch.nn.Parameter:
    """Shard the full parameter ``new`` like the one it replaces and put it in that one's place.

    A new ``FSDPParam`` (same mesh, shard placement, mixed-precision and offload policies, module and
    attribute) replaces the old one at the same index of the same ``FSDPParamGroup``; its constructor
    registers the new sharded ``DTensor`` on the module. Returns that sharded parameter.

    Raises:
        NotImplementedError: the old parameter was itself a ``DTensor`` before ``fully_shard`` (tensor
            parallel / SPMD meshes: not supported), or FSDP cannot shard the new shape (uneven sharding on a
            dim other than 0).
    """
    FSDPParam, ParamModuleInfo = _internals()
    try:
        group, old = where.group, where.fsdp_param
        if new.device != group.device or not new.is_contiguous():
            new = torch.nn.Parameter(
                new.detach().to(group.device).contiguous(), requires_grad=new.requires_grad
            )
        if getattr(old, "is_dtensor", False):
            raise NotImplementedError(
                f"cannot re-shard {old._param_fqn}: it was a DTensor before fully_shard (tensor parallel or an SPMD "
                "mesh); only plain data-parallel FSDP2 (a 1-D or HSDP mesh) is supported"
            )
        info = old._module_info
        placement = old.fsdp_placement
        new_param = FSDPParam(
            new,
            ParamModuleInfo(
                info.module, info.param_name, list(info.shared_modules), list(info.shared_param_names)
            ),
            old.mesh_info,
            old.post_forward_mesh_info,
            group.device,
            lambda _param: placement,
            group.mp_policy,
            group.offload_policy,
        )
        new_param._param_fqn = old._param_fqn
        new_param.init_dtype_attrs(group.mp_policy)
        old._post_load_hook_handle.remove()  # the old record must not re-pad the module's new parameter
        group.fsdp_params[where.index] = new_param
        return new_param.sharded_param
    except AttributeError as exc:
        raise _missing(exc) from exc


def _restore_sharded(where: _Sharded) -> None:
    """Register the (unchanged) sharded parameter of ``where`` on its module again."""
    try:
        where.fsdp_param._setattr_on_modules(where.fsdp_param.sharded_param)
    except AttributeError as exc:
        raise _missing(exc) from exc


def _reshard_all(model: torch.nn.Module) -> None:
    """Every FSDP unit of ``model`` in its sharded state (public ``FSDPModule.reshard``)."""
    cls = _fsdp_module_class()
    for module in model.modules():
        if isinstance(module, cls):
            module.reshard()


# --------------------------------------------------------------------------------------------
# a layer seen with full tensors


@dataclass
class _FullView:
    """The parameters of one layer while it sees full tensors (see :func:`_full_parameters`).

    ``resharded``: after the block, ``id(new full parameter) -> (old full view, old sharded, new sharded)``
    for every parameter the layer replaced.
    """

    entries: list[tuple[torch.nn.Module, str, torch.nn.Parameter, _Sharded | None]]
    resharded: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter]] = field(
        default_factory=dict
    )


def _owners(layer: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    return [(m, name) for m in layer.modules() for name, p in m._parameters.items() if p is not None]


@contextmanager
def _full_parameters(layer: torch.nn.Module, sharded: dict[int, _Sharded]) -> Iterator[_FullView]:
    """Put full (unsharded) copies of ``layer``'s FSDP parameters on it for the time of the block.

    On exit a parameter the layer kept gets its sharded ``DTensor`` back; one the layer replaced (by a
    plain, full ``nn.Parameter``) is sharded again in its FSDP group (:func:`_reshard_param`) and recorded
    in ``view.resharded``.
    Every rank must enter the block for the same layer (``full_tensor`` is a collective).
    """
    entries = []
    for module, name in _owners(layer):
        param = module._parameters[name]
        where = sharded.get(id(param))
        if where is None:  # not managed by FSDP (ignored_params): the layer sees it as it is
            entries.append((module, name, param, None))
            continue
        full = torch.nn.Parameter(_full(param.detach()), requires_grad=param.requires_grad)
        module._parameters[name] = full
        entries.append((module, name, full, where))
    view = _FullView(entries)
    try:
        yield view
    finally:
        for module, name, full, where in entries:
            if where is None:
                continue
            current = module._parameters.get(name)
            if current is full:
                _restore_sharded(where)
            else:
                old = where.fsdp_param.sharded_param
                view.resharded[id(current)] = (full, old, _reshard_param(where, current))


# --------------------------------------------------------------------------------------------
# planning


class _PlannedLayer:
    """What a planner sees of one layer on rank 0: ``layer_idx``, ``state_size`` and its ``lti_system()``
    (computed from the full parameters and the pooled statistics; a ``ValueError`` it raised is raised
    again, so :func:`~compressm_hf.engine.plan_layers` skips the layer with its reason)."""

    def __init__(self, layer: torch.nn.Module, system: Any = None, error: ValueError | None = None):
        self.layer_idx = int(layer.layer_idx)
        self.state_size = int(layer.state_size)
        self._system, self._error = system, error

    def lti_system(self):
        if self._error is not None:
            raise self._error
        return self._system


def _system_of(layer: torch.nn.Module) -> _PlannedLayer:
    try:
        return _PlannedLayer(layer, system=layer.lti_system())
    except ValueError as exc:
        return _PlannedLayer(layer, error=exc)


def _decide(
    layers: Sequence[torch.nn.Module],
    sharded: dict[int, _Sharded],
    plans: Plans,
    seed: int,
    step: int | None,
    target_total: int | None,
) -> LayerPlans:
    """Rank 0's :class:`LayerPlans`, on every rank (planned on rank 0 when ``plans`` is a planner)."""
    what = f"the CompreSSM FSDP2 plan of step {step}"
    if isinstance(plans, (LayerPlans, Mapping)):
        return broadcast_objects([as_layer_plans(plans)], what=what)[0]
    if isinstance(plans, RankPolicy) or callable(plans):
        pool_statistics_(layers)  # every rank's tokens (each rank now holds the sums over all ranks)
        views = []
        for layer in layers:
            with _full_parameters(layer, sharded):
                if distributed_rank() == 0:
                    views.append(_system_of(layer))

        def decide() -> LayerPlans:
            if isinstance(plans, RankPolicy):
                return plan_layers(views, plans, seed=seed, step=step, target_total=target_total)
            return as_layer_plans(plans(views))

        return decided_on_rank0(decide, what)
    raise TypeError(
        "plans must be a LayerPlans, a {layer_idx: ReductionPlan} mapping, a RankPolicy or a callable "
        f"(layers -> LayerPlans) run on rank 0, got {type(plans).__name__}"
    )


# --------------------------------------------------------------------------------------------
# optimizer state


class _FullStateOptimizer(torch.optim.Optimizer):
    """A holder of full-tensor optimizer state, for :func:`transplant_optimizer_state` (never steps)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__([{"params": params}], {})

    def step(self, closure=None):  # pragma: no cover - never called
        raise RuntimeError("_FullStateOptimizer only holds state for a transplant; it does not step")


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (the shape of the sharded ``param``) as a ``DTensor`` with ``param``'s mesh and placements."""
    from torch.distributed.tensor import distribute_tensor

    out = distribute_tensor(full.contiguous(), param.device_mesh, param.placements, src_data_rank=None)
    if out.to_local().shape != param.to_local().shape:
        raise RuntimeError(
            f"optimizer state sharded to {tuple(out.to_local().shape)} on rank {distributed_rank()}, the parameter's "
            f"shard is {tuple(param.to_local().shape)} (global {tuple(param.shape)})"
        )
    return out


@torch.no_grad()
def _carry_optimizer_state(optimizer: Any, full_swaps: list, view: _FullView, mode: str) -> tuple[list, dict]:
    """Move the optimizer slots of one layer's swapped parameters to the new sharded parameters.

    ``full_swaps``: the layer's swaps (full view parameters). Returns ``(sharded swaps, counts)``.
    """
    opt = base_optimizer(optimizer)
    olds, sharded_swaps, pairs = [], [], []
    for swap in full_swaps:
        old_full, new_full, state_dim, keep = as_param_swap(swap)
        found = view.resharded.get(id(new_full))
        if found is None or found[0] is not old_full:
            raise RuntimeError(
                f"a swap of {tuple(old_full.shape)} -> {tuple(new_full.shape)} is not a parameter the layer replaced "
                "on itself; under FSDP2 a layer's reduce_ must replace its own FSDP parameters (setattr on the "
                "layer or its submodules) and report each one as (old, new, state_dim, keep)"
            )
        _, old_sharded, new_sharded = found
        olds.append(old_full)
        pairs.append((old_sharded, new_sharded, old_full, new_full))
        sharded_swaps.append(ParamSwap(old=old_sharded, new=new_sharded, state_dim=state_dim, keep=keep))
    if len(pairs) != len(view.resharded):
        raise RuntimeError(
            f"the layer replaced {len(view.resharded)} FSDP parameters but reported {len(pairs)} swaps; every "
            "replaced parameter must be reported so that its optimizer state follows"
        )
    holder = _FullStateOptimizer(olds) if olds else None
    kinds: dict[int, dict[str, bool]] = {}
    for old_sharded, _, old_full, _ in pairs:
        st = opt.state.get(old_sharded)
        if st:
            kinds[id(old_full)] = {k: _is_dtensor(v) for k, v in st.items()}
            holder.state[old_full] = {k: (_full(v) if _is_dtensor(v) else v) for k, v in st.items()}
    counts = transplant_optimizer_state(holder, full_swaps, mode) if holder is not None else {}
    for old_sharded, new_sharded, old_full, new_full in pairs:
        opt.state.pop(old_sharded, None)
        carried = holder.state.get(new_full)
        transplant_optimizer_state(opt, [(old_sharded, new_sharded, None, None)], mode)  # the group slot only
        if carried:
            was = kinds.get(id(old_full), {})
            opt.state[new_sharded] = {
                k: (_shard_like(v, new_sharded) if was.get(k) and torch.is_tensor(v) else v)
                for k, v in carried.items()
            }
    return sharded_swaps, counts


# --------------------------------------------------------------------------------------------
# the event


def _add(total: dict[str, int], counts: Mapping[str, int]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + int(value)


@torch.no_grad()
def compress_fully_sharded(
    model: torch.nn.Module,
    optimizer: Any,
    plans: Plans,
    *,
    optimizer_state: str = "slice",
    seed: int = 0,
    step: int | None = None,
    target_total: int | None = None,
) -> FSDPCompressionEvent:
    """Shrink every reducible layer of the FSDP2 model ``model`` in place, on every rank, and carry ``optimizer``.

    Call it on every rank at the same point, between optimizer steps (after ``optimizer.step()``; gradients
    are not carried), with the same arguments.

    Args:
        model: a model with ``fully_shard`` applied (to its blocks and/or its root); its parameters are
            ``DTensor`` s sharded on one mesh (1-D FSDP or HSDP; no tensor parallelism).
        optimizer: the optimizer built on the sharded parameters (or a wrapper of one, e.g. accelerate's).
        plans: who decides, rank 0's decision being sent to every rank:
            a callable ``layers -> LayerPlans | {layer_idx: ReductionPlan}``, run on rank 0 with one record
            per reducible layer (``layer_idx``, ``state_size`` and ``lti_system()`` from the layer's full
            parameters and the statistics summed over the ranks), e.g.
            ``lambda layers: plan_layers(layers, policy, seed=seed, step=step)``; or a
            :class:`~compressm_hf.RankPolicy` (then :func:`~compressm_hf.engine.plan_layers` with ``seed``,
            ``step``, ``target_total``); or decisions made already (a :class:`LayerPlans` or a mapping).
        optimizer_state: ``"slice"`` or ``"reset"`` (see
            :func:`~compressm_hf.trainer.surgery.transplant_optimizer_state`).
        seed, step, target_total: for planning with a ``RankPolicy`` (see :func:`plan_layers`); ``step`` also
            names the event in messages.

    Returns:
        :class:`FSDPCompressionEvent` (same records and sizes on every rank; ``swaps`` are the sharded
        parameters, the optimizer state is already carried).

    Raises:
        ValueError: ``optimizer_state`` is not one of ``"slice"``, ``"reset"``.
        TypeError: ``model`` is not an FSDP2 model, or ``plans`` is none of the kinds above.
        FSDPInternalsError: this torch lacks the FSDP2 internals re-sharding needs.
        compressm_hf.engine.StateSizeMismatchError: a layer did not record its new size in the config.
    """
    t0 = time.perf_counter()
    if optimizer_state not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}")
    if not is_fully_sharded(model):
        raise TypeError(
            f"compress_fully_sharded needs a model with fully_shard applied, got {type(model).__name__} without "
            "FSDP2 units; use compressm_hf.compress_model (and transplant_optimizer_state) instead"
        )
    _internals()
    _reshard_all(model)
    sharded = _sharded_params(model)
    layers = find_reducible_layers(model)
    decided = _decide(layers, sharded, plans, seed, step, target_total)

    sizes_before = [int(layer.state_size) for layer in layers]
    swaps, records, counts = [], [], {}
    for layer in layers:
        plan = decided.plans.get(int(layer.layer_idx))
        if plan is None or int(plan.rank) >= int(layer.state_size):
            records.extend(apply_plans([layer], decided)[1])  # the record of a layer left as it is
            continue
        with _full_parameters(layer, sharded) as view:
            layer_swaps, layer_records = apply_plans([layer], decided)
        records.extend(layer_records)
        layer_sharded, layer_counts = _carry_optimizer_state(optimizer, layer_swaps, view, optimizer_state)
        swaps.extend(layer_sharded)
        _add(counts, layer_counts)
        sharded = _sharded_params(model)  # the replaced records
    sizes_after = check_state_sizes(model, layers)
    return FSDPCompressionEvent(
        swaps=swaps,
        layers=records,
        sizes_before=sizes_before,
        sizes_after=sizes_after,
        skipped=dict(decided.skipped),
        budget=decided.budget,
        wall_time_s=time.perf_counter() - t0,
        optimizer=counts,
    )


# --------------------------------------------------------------------------------------------
# saving


def save_pretrained_fully_sharded(model: torch.nn.Module, save_directory: str, **kwargs: Any) -> dict | None:
    """``save_pretrained`` of a ``fully_shard`` model: the full state dict, written by rank 0.

    Every rank must call it (gathering the state dict is a collective). The state dict comes from
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, full_state_dict=True,
    cpu_offload=True)``; rank 0 writes it with the model's own class: calling ``save_pretrained`` on the
    model as it is would record ``fully_shard``'s class (``_fsdp_init.FSDP<Class>``) in the config's
    ``auto_map`` and copy torch's FSDP source files next to the weights (checked with torch 2.13,
    transformers 5.24), so the folder would not load with ``trust_remote_code``. Returns the state dict on
    rank 0, ``None`` elsewhere; ``kwargs`` go to ``save_pretrained`` (not ``state_dict``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if "state_dict" in kwargs:
        raise TypeError("save_pretrained_fully_sharded gathers the state dict itself; do not pass state_dict")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed_rank() == 0:
        with as_unsharded_class(model) as plain:
            plain.save_pretrained(save_directory, state_dict=state, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    return state if distributed_rank() == 0 else None


# --------------------------------------------------------------------------------------------
# measurement


def local_state_bytes(modules: Sequence[torch.nn.Module], optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds for the parameters of ``modules`` and their optimizer state.

    ``{"params": ..., "optimizer": ...}``: for a ``DTensor`` the local shard (``to_local()``, padding
    excluded), otherwise the whole tensor; every tensor of each parameter's optimizer state (``step``
    included) is counted. A parameter shared by several modules counts once.
    """
    opt = base_optimizer(optimizer)
    seen: set[int] = set()
    out = {"params": 0, "optimizer": 0}

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if _is_dtensor(t) else t
        return local.numel() * local.element_size()

    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out["params"] += nbytes(p)
            for value in opt.state.get(p, {}).values():
                if torch.is_tensor(value):
                    out["optimizer"] += nbytes(value)
    return out
