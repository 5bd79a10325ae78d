"""Keeping the training stack consistent after a layer replaced some of its parameters.

When a mixer shrinks (``reduce_``), it swaps ``nn.Parameter`` objects. Nothing else notices:

* the optimizer keeps stepping the *old* parameters, so the new ones silently never update (no
  error, no warning; verified with transformers 5.23: ``max|dW| = 0`` after the swap). Hence
  :func:`transplant_optimizer_state`, which puts every new parameter into the *same* parameter
  group as its old one (same lr / weight decay; the LR scheduler is untouched) and carries the
  optimizer state along;
* DDP's reducer keeps buckets sized for the old parameters, so the new parameters' gradients are
  never all-reduced and ranks silently diverge. Hence :func:`rebuild_ddp_in_place_`, which re-runs
  ``DistributedDataParallel.__init__`` on the *same* object (the Trainer's training loop holds a
  local reference to it, so replacing the object does not work);
* every rank must apply the same cut: :func:`broadcast_objects` sends rank 0's decisions.

Everything here is model-agnostic: it only sees :class:`compressm_hf.ParamSwap` records.
"""

from __future__ import annotations

import datetime
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compressm_hf.engine import check_state_sizes
from compressm_hf.protocol import as_param_swap

logger = logging.getLogger(__name__)

__all__ = [
    "decided_on_rank0",
    "gathered_objects",
    "OPTIMIZER_STATE_MODES",
    "PeerTimeoutError",
    "apply_ddp_timeout",
    "base_optimizer",
    "broadcast_objects",
    "ddp_init_kwargs",
    "distributed_barrier",
    "distributed_rank",
    "is_distributed",
    "move_to_cpu",
    "process_group_timeout",
    "rebuild_ddp_in_place_",
    "restore_training_state",
    "snapshot_training_state",
    "transplant_optimizer_state",
]

OPTIMIZER_STATE_MODES = ("slice", "reset")

# Scalar bookkeeping entries that are never transformed (the bias correction continues).
_SCALAR_KEYS = frozenset({"step"})


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (unwraps accelerate's ``AcceleratedOptimizer``).

    ``AcceleratedOptimizer.param_groups``/``.state`` delegate to the inner optimizer, so mutating
    the inner one is enough (and the LR scheduler, which holds the wrapper, sees the change).
    """
    opt = optimizer
    seen = set()
    while id(opt) not in seen:
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt and hasattr(inner, "param_groups"):
            opt = inner
            continue
        break
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
        )
    return opt


def _carry(
    value: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    state_dim: int | None,
    keep: torch.Tensor | None,
    mode: str,
) -> torch.Tensor | None:
    """Map one per-element state tensor (shape of ``old``) to the shape of ``new``.

    Returns ``None`` when no mapping exists (the caller then drops the whole entry).
    """
    if value.shape == new.shape and (state_dim is None or old.shape == new.shape):
        return value.detach().clone().to(device=new.device)  # same coordinates: copy
    if value.shape != old.shape:
        return None
    if mode == "reset":
        return torch.zeros(new.shape, dtype=value.dtype, device=new.device)
    if keep is not None and state_dim is not None:
        dim = state_dim % old.dim()
        idx = keep.to(device=value.device, dtype=torch.long)
        out = value.index_select(dim, idx)
        if out.shape == new.shape:
            return out.clone().to(device=new.device)
        # keep given but other axes differ as well: fall through to leading-entries slicing of those
        value = out
    if value.dim() != new.dim():
        return torch.zeros(new.shape, dtype=value.dtype, device=new.device)
    # legacy-faithful: leading entries along every axis that shrank (old[:r]); zeros where it grew
    out = value
    for d, (have, want) in enumerate(zip(out.shape, new.shape)):
        if want < have:
            out = out.narrow(d, 0, want)
    if tuple(out.shape) != tuple(new.shape):
        padded = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
        padded[tuple(slice(0, s) for s in out.shape)] = out
        out = padded
    return out.clone().to(device=new.device)


@torch.no_grad()
def transplant_optimizer_state(
    optimizer: Any,
    swaps: Iterable,
    mode: str = "slice",
) -> dict[str, int]:
    """Move every swapped parameter's slot in ``optimizer`` from ``old`` to ``new``.

    * ``param_groups``: ``old`` is replaced by ``new`` at the same position of the *same* group
      (learning rate, weight decay, the ssm/main split and the LR scheduler stay as they were).
      A parameter that was in no group (frozen) stays out.
    * ``state``: the entry of ``old`` is removed. Per-element tensors (``exp_avg``,
      ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ... -- any tensor shaped like
      ``old``) are mapped to the shape of ``new``:

      - ``mode="slice"``: ``index_select(state_dim, keep)`` when the swap gives ``keep`` (exact:
        modal truncation), else the leading entries ``[:r]`` of every shrunken axis (the legacy
        JAX code's behaviour after balanced truncation, where the new coordinates have no
        correspondence with the old ones);
      - ``mode="reset"``: fresh zero moments.

      A swap with ``state_dim=None`` and unchanged shape copies the state as is (either mode).
      The scalar ``step`` is always kept, so bias correction and the schedule continue. An
      entry holding a tensor that fits neither shape (e.g. Adafactor's factored moments) is
      dropped and re-initialised lazily by the optimizer.

    Returns counts ``{"swapped", "carried", "reset", "dropped"}`` for logging.
    """
    if mode not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {mode!r}")
    opt = base_optimizer(optimizer)
    fields = [as_param_swap(s) for s in swaps]
    # Chains (a swapped twice in one event: a -> b -> c) collapse to a -> c.
    by_old: dict[int, tuple] = {}
    for old, new, state_dim, keep in fields:
        by_old[id(old)] = (old, new, state_dim, keep)
    counts = {"swapped": 0, "carried": 0, "reset": 0, "dropped": 0}
    if not by_old:
        return counts

    for group in opt.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if id(p) in by_old:
                params[i] = by_old[id(p)][1]
                counts["swapped"] += 1

    for old, new, state_dim, keep in by_old.values():
        st = opt.state.pop(old, None)
        if not st:
            continue
        new_state: dict = {}
        ok = True
        for key, value in st.items():
            if key in _SCALAR_KEYS or not torch.is_tensor(value) or value.dim() == 0 and old.dim() != 0:
                new_state[key] = value
                continue
            mapped = _carry(value, old, new, state_dim, keep, mode)
            if mapped is None:
                ok = False
                break
            new_state[key] = mapped
        if not ok:
            counts["dropped"] += 1
            warnings.warn(
                f"optimizer state of a swapped parameter {tuple(old.shape)} -> {tuple(new.shape)} has tensors of "
                f"other shapes ({ {k: tuple(v.shape) for k, v in st.items() if torch.is_tensor(v)} }); it is reset",
                stacklevel=2,
            )
            continue
        opt.state[new] = new_state
        if mode == "reset" and old.shape != new.shape:
            counts["reset"] += 1
        else:
            counts["carried"] += 1
    return counts


# --------------------------------------------------------------------------------------------
# distributed helpers


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def move_to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are plain, detached CPU tensors (safe to pickle/broadcast)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: move_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        items = [move_to_cpu(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(
            obj, **{f.name: move_to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


class PeerTimeoutError(RuntimeError):
    """A collective of the callback did not complete: a peer rank is stalled (or dead)."""


def _backends(group=None) -> list:
    group = group or torch.distributed.distributed_c10d._get_default_group()
    found = []
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
        except (RuntimeError, ValueError, AttributeError):
            continue
        if backend is not None and all(backend is not b for b in found):
            found.append(backend)
    return found


def process_group_timeout(group=None) -> datetime.timedelta | None:
    """The timeout the collectives of ``group`` (default: the default group) run under, if readable.

    The longest one when the group has several backends (e.g. ``cpu:gloo,cuda:nccl``).
    """
    if not is_distributed():
        return None
    timeouts = []
    for backend in _backends(group):
        value = getattr(getattr(backend, "options", None), "_timeout", None)
        if isinstance(value, datetime.timedelta):
            timeouts.append(value)
    return max(timeouts) if timeouts else None


def apply_ddp_timeout(ddp_timeout: float | None) -> bool:
    """Make the default process group's collectives time out after ``ddp_timeout`` seconds.

    ``TrainingArguments.ddp_timeout`` is meant to be the process group's timeout, but transformers
    (checked with 5.24) drops it when ``use_cpu=True``: ``_setup_devices`` passes ``timeout`` to
    accelerate's ``PartialState`` only on the accelerator path, so a CPU/gloo run gets torch's
    30-minute default, and a stalled peer blocks the other ranks (in DDP's gradient all-reduce, in
    the callback's plan broadcast) for 30 minutes whatever ``--ddp_timeout`` says.

    The timeout is applied only when the group still has torch's *default* timeout for its backend
    (nobody chose one); a timeout set explicitly by whoever initialised the group is kept. Returns
    True when the timeout was changed.
    """
    if not is_distributed() or not ddp_timeout or ddp_timeout <= 0:
        return False
    wanted = datetime.timedelta(seconds=float(ddp_timeout))
    current = process_group_timeout()
    if current is None or current == wanted:
        return False
    c10d = torch.distributed.distributed_c10d
    try:
        default = c10d._get_default_timeout(torch.distributed.get_backend())
    except Exception:  # an unknown/custom backend: leave it alone
        return False
    if current != default:
        logger.info(
            "CompreSSM: the process group's timeout (%s) was set explicitly; ddp_timeout=%s s is not applied",
            current,
            ddp_timeout,
        )
        return False
    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        for backend in _backends():
            backend._set_default_timeout(wanted)
    else:
        setter(wanted)
    logger.info(
        "CompreSSM: process-group timeout set to ddp_timeout=%s s (it was torch's default %s)",
        ddp_timeout,
        current,
    )
    return True


def _limit_text(timeout: datetime.timedelta | None) -> str:
    return f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"


def _peer_timeout(what: str, t0: float, exc: BaseException) -> PeerTimeoutError:
    return PeerTimeoutError(
        f"CompreSSM: {what} failed on rank {distributed_rank()} of {torch.distributed.get_world_size()} after "
        f"{time.monotonic() - t0:.1f} s (process-group timeout {_limit_text(process_group_timeout())}, "
        f"TrainingArguments.ddp_timeout): a peer rank is stalled or has died ({type(exc).__name__}: {exc})"
    )


_BARRIER_TAG = 0x5C0  # p2p tags live apart from gloo's collective slots


def _gloo_on_cpu() -> bool:
    from torch.distributed import ProcessGroupGloo

    try:
        backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    except (RuntimeError, ValueError, AttributeError):
        return False
    return isinstance(backend, ProcessGroupGloo)


def _wait(work, seconds: float) -> bool:
    try:
        work.wait(datetime.timedelta(seconds=max(seconds, 0.05)))  # timedelta(0) would mean "no timeout"
    except RuntimeError:
        return False
    return True


def _monitored_barrier(timeout: datetime.timedelta) -> None:
    """``monitored_barrier`` whose every rank honours ``timeout``; raises naming the missing ranks.

    torch's ``monitored_barrier`` (2.13) bounds only rank 0's wait: with rank 0 stalled, the other ranks
    stayed blocked well past its ``timeout`` once the group's timeout had been lowered after
    ``init_process_group`` (their send/recv to rank 0 wait without an explicit timeout, apparently under
    the gloo context's timeout fixed at init). Here each rank waits with an explicit timeout on
    point-to-point messages: every rank reports to rank 0, which answers everyone with the list of ranks
    that did not report in time.
    """
    dist = torch.distributed
    rank, world, seconds = dist.get_rank(), dist.get_world_size(), timeout.total_seconds()
    deadline = time.monotonic() + seconds
    if rank == 0:
        pending = {r: dist.irecv(torch.zeros(1), src=r, tag=_BARRIER_TAG) for r in range(1, world)}
        missing = [r for r, work in pending.items() if not _wait(work, deadline - time.monotonic())]
        verdict = torch.zeros(world)
        verdict[missing] = 1.0
        replies = [dist.isend(verdict, dst=r, tag=_BARRIER_TAG) for r in range(1, world) if r not in missing]
        for work in replies:
            _wait(work, seconds)
    else:
        if not _wait(dist.isend(torch.ones(1), dst=0, tag=_BARRIER_TAG), seconds):
            raise TimeoutError(f"rank 0 did not reach the barrier within {seconds:g} s")
        verdict = torch.zeros(world)
        # rank 0 answers once every rank reported or the timeout passed for the missing ones
        if not _wait(
            dist.irecv(verdict, src=0, tag=_BARRIER_TAG), max(deadline - time.monotonic(), 0) + seconds
        ):
            raise TimeoutError(f"rank 0 did not answer at the barrier within {seconds:g} s")
        missing = [int(r) for r in verdict.nonzero().flatten()]
    if missing:
        raise TimeoutError(
            f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not reach the barrier "
            f"within {seconds:g} s"
        )


def distributed_barrier(what: str = "barrier") -> None:
    """A barrier that ends with :class:`PeerTimeoutError` after the process group's timeout.

    With a gloo backend on the CPU every rank waits with an explicit timeout and the error names the
    ranks that did not arrive; otherwise it is ``torch.distributed.barrier()`` (bounded by the group's
    timeout).
    """
    if not is_distributed():
        return
    t0 = time.monotonic()
    timeout = process_group_timeout()
    try:
        if timeout is not None and _gloo_on_cpu():
            _monitored_barrier(timeout)
        else:
            torch.distributed.barrier()
    except (RuntimeError, TimeoutError) as exc:
        raise _peer_timeout(what, t0, exc) from exc


def broadcast_objects(objects: Sequence[Any], src: int = 0, what: str = "broadcast") -> list[Any]:
    """Rank ``src``'s ``objects`` on every rank (identity when not distributed).

    Tensors are moved to the CPU first (``broadcast_object_list`` pickles; CPU tensors keep the
    payload backend-independent). Every rank must call this with a list of the same length.
    A peer that does not take part within the process group's timeout ends it with
    :class:`PeerTimeoutError` (a :func:`distributed_barrier` first, which names the missing ranks on gloo).
    """
    objects = [move_to_cpu(o) for o in objects]
    if not is_distributed():
        return objects
    distributed_barrier(what)
    payload = list(objects)
    t0 = time.monotonic()
    try:
        torch.distributed.broadcast_object_list(payload, src=src)
    except RuntimeError as exc:
        raise _peer_timeout(what, t0, exc) from exc
    return payload


def gathered_objects(obj: Any, what: str = "gather") -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` when not distributed); a peer that does not take part
    within the process group's timeout ends it with :class:`PeerTimeoutError`, as in :func:`broadcast_objects`."""
    obj = move_to_cpu(obj)
    if not is_distributed():
        return [obj]
    distributed_barrier(what)
    out: list[Any] = [None] * torch.distributed.get_world_size()
    t0 = time.monotonic()
    try:
        torch.distributed.all_gather_object(out, obj)
    except RuntimeError as exc:
        raise _peer_timeout(what, t0, exc) from exc
    return out


@dataclass
class _Rank0Failed:
    """Sent instead of rank 0's result when it raised (so that no rank waits in the broadcast until a timeout)."""

    reason: str


def decided_on_rank0(decide, what: str):
    """``decide()`` run on rank 0 only, its result on every rank (:func:`broadcast_objects`).

    When ``decide`` raises on rank 0 the other ranks are told at once: rank 0 raises the error itself, every other
    rank a ``RuntimeError`` naming it (instead of waiting in the broadcast until the process group times out).
    """
    if not is_distributed():
        return decide()
    result = None
    if distributed_rank() == 0:
        try:
            result = decide()
        except Exception as exc:
            broadcast_objects([_Rank0Failed(f"{type(exc).__name__}: {exc}")], what=what)
            raise
    result = broadcast_objects([result], what=what)[0]
    if isinstance(result, _Rank0Failed):
        raise RuntimeError(f"{what}: rank 0 failed ({result.reason}); nothing was changed")
    return result


def ddp_init_kwargs(ddp: torch.nn.parallel.DistributedDataParallel) -> dict:
    """The constructor arguments of an existing DDP wrapper (torch-version aware)."""
    kw = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "process_group": ddp.process_group,
        "bucket_cap_mb": ddp.bucket_bytes_cap / 2**20,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": ddp.static_graph,
    }
    if hasattr(ddp, "forward_sync_buffers"):  # torch >= 2.13 (broadcast_buffers is deprecated)
        kw["forward_sync_buffers"] = ddp.forward_sync_buffers
    else:
        kw["broadcast_buffers"] = ddp.broadcast_buffers
    # ddp.device_ids is None on CPU; DDP.__init__ expects None there too.
    return kw


def rebuild_ddp_in_place_(ddp: torch.nn.Module) -> bool:
    """Rebuild a ``DistributedDataParallel`` wrapper around its (reshaped) module, in place.

    ``DDP.__init__(ddp, ddp.module, **same_kwargs)`` rebuilds the reducer and buckets for the
    current parameters and re-broadcasts rank 0's parameters and buffers. The object identity is
    kept, which matters: ``Trainer._run_epoch`` holds a local reference to it until ``train()``
    returns. Communication hooks registered on the old reducer (e.g. through accelerate's
    ``DistributedDataParallelKwargs(comm_hook=...)``) are *not* re-registered.

    Returns True if ``ddp`` was a DDP wrapper (and was rebuilt), False otherwise (no-op).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp, DDP):
        return False
    kwargs = ddp_init_kwargs(ddp)
    module = ddp.module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        DDP.__init__(ddp, module, **kwargs)
    logger.debug(
        "rebuilt DistributedDataParallel in place (%d parameters)", sum(1 for _ in module.parameters())
    )
    return True


# --------------------------------------------------------------------------------------------
# exact snapshots (pragmatic mode's rollback)


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


@torch.no_grad()
def snapshot_training_state(
    model: torch.nn.Module, optimizer: Any, layers: Sequence[torch.nn.Module]
) -> dict:
    """CPU copies of everything a rollback needs: weights, layer sizes and optimizer state.

    Optimizer entries are keyed by parameter *name* (parameter objects are replaced by a cut),
    and the membership of every parameter group is recorded by name and position.
    """
    opt = base_optimizer(optimizer)
    names = _param_names(model)
    config = getattr(model, "config", None)
    state_sizes = getattr(config, "state_sizes", None)
    return {
        "sizes": {int(layer.layer_idx): int(layer.state_size) for layer in layers},
        "state_sizes": None if state_sizes is None else list(state_sizes),
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "groups": [[names.get(id(p)) for p in g["params"]] for g in opt.param_groups],
        # (cpu copy, original device) per tensor: AdamW's scalar ``step`` lives on the CPU unless
        # ``capturable``/``fused``, the moments on the parameter's device.
        "optimizer": {
            names[id(p)]: {
                k: ((v.detach().to("cpu", copy=True), str(v.device)) if torch.is_tensor(v) else v)
                for k, v in st.items()
            }
            for p, st in opt.state.items()
            if id(p) in names
        },
    }


@torch.no_grad()
def restore_training_state(
    model: torch.nn.Module, optimizer: Any, layers: Sequence[torch.nn.Module], snapshot: dict
) -> None:
    """Undo everything since :func:`snapshot_training_state`, exactly.

    Layers whose size changed are resized back (``layer.resize_``), all weights are reloaded,
    every parameter group again holds the model's current parameter objects at the recorded
    positions, and the optimizer state (including ``step``) is the snapshot's. ``config.state_sizes``
    is written by the layers' ``resize_`` and checked here
    (:func:`compressm_hf.engine.check_state_sizes`)."""
    opt = base_optimizer(optimizer)
    by_idx = {int(layer.layer_idx): layer for layer in layers}
    for idx, n in snapshot["sizes"].items():
        layer = by_idx.get(int(idx))
        if layer is None:
            raise ValueError(f"cannot restore layer {idx}: no reducible layer with that layer_idx any more")
        if int(layer.state_size) != int(n):
            if not callable(getattr(layer, "resize_", None)):
                raise ValueError(
                    f"layer {idx} ({type(layer).__name__}) has no resize_(); cannot roll back a cut"
                )
            layer.resize_(int(n))
    model.load_state_dict(snapshot["model"], strict=True)
    current = dict(model.named_parameters(remove_duplicate=True))
    if len(snapshot["groups"]) != len(opt.param_groups):
        raise ValueError(
            f"optimizer has {len(opt.param_groups)} parameter groups, the snapshot {len(snapshot['groups'])}"
        )
    restored = []
    for group, names in zip(opt.param_groups, snapshot["groups"]):
        params = group["params"]
        if len(params) != len(names):
            raise ValueError("optimizer parameter groups changed size since the snapshot; cannot roll back")
        for i, name in enumerate(names):
            if name is not None:
                params[i] = current[name]
                restored.append(params[i])
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for p in list(opt.state.keys()):
        if id(p) not in in_groups or id(p) in {id(q) for q in restored}:
            del opt.state[p]
    for name, st in snapshot["optimizer"].items():
        p = current.get(name)
        if p is None or id(p) not in in_groups:
            continue
        opt.state[p] = {
            k: (v[0].to(device=v[1], copy=True) if isinstance(v, tuple) else v) for k, v in st.items()
        }
    check_state_sizes(model, layers)  # resize_ recorded the sizes (the layers are the one writer)
