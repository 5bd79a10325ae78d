"""Finding the ``transformers.Trainer`` that runs a callback (the one place that does it).

Trainer events receive the model, optimizer, scheduler and dataloaders, but not the Trainer. The
callback needs it for the DDP wrapper (``trainer.model_wrapped``, rebuilt in place after a cut), for
``trainer.log`` and to check the evaluation set of pragmatic mode. The user's API is the plain
``Trainer(callbacks=[CompreSSMCallback()])``, so the Trainer is found, once per event that needs it, by
walking the Python call stack for the first frame whose ``self`` is a ``transformers.Trainer``
(subclasses included: ``Seq2SeqTrainer``, TRL's trainers, your own). Every entry point that builds and
runs a Trainer calls the callback events from inside a Trainer method (``Trainer.__init__`` ->
``on_init_end``; ``Trainer.train`` -> ``_inner_training_loop`` -> ``CallbackHandler.on_train_begin`` ->
``call_event`` -> the callback), so the Trainer is a few frames up. ``CompreSSMCallback.bind(trainer)``
overrides the search.

Under DDP a cut without the Trainer would leave the DDP wrapper with the old parameters, and the ranks
would silently diverge: :func:`resolve_trainer` raises instead.
"""

from __future__ import annotations

import inspect
import os

__all__ = [
    "TrainerNotFoundError",
    "find_trainer",
    "fsdp_version",
    "refuse_unsupported_wrapper",
    "resolve_trainer",
    "unsupported_wrapper",
]

MAX_DEPTH = 64


class TrainerNotFoundError(RuntimeError):
    """No ``transformers.Trainer`` on the call stack where one is required (a distributed run)."""


def _trainer_frames(max_depth: int):
    """``(frame, trainer)`` for every frame up the stack (at most ``max_depth``) whose ``self`` is a Trainer."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None  # skip this generator's own frame
        depth = 0
        while frame is not None and depth < max_depth:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                yield frame, candidate
            frame = frame.f_back
            depth += 1
    finally:
        del frame


def find_trainer(max_depth: int = MAX_DEPTH):
    """The ``transformers.Trainer`` up the call stack (the ``self`` of a calling frame), or None."""
    for _, trainer in _trainer_frames(max_depth):
        return trainer
    return None


def _resume_checkpoint_on_stack(max_depth: int = MAX_DEPTH) -> str | None:
    """``resume_from_checkpoint`` of the running ``Trainer.train``/``_inner_training_loop`` call, if any."""
    for frame, _ in _trainer_frames(max_depth):
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def _multi_process() -> bool:
    """Whether ``torch.distributed`` is initialized with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_trainer(bound, *, distributed: bool | None = None, max_depth: int = MAX_DEPTH):
    """``bound`` if given (``CompreSSMCallback.bind``), else the Trainer on the call stack.

    Args:
        bound: the explicitly bound Trainer, or None.
        distributed: whether ``torch.distributed`` runs with more than one process (None: ask torch).

    Returns:
        The Trainer, or None in a single process (the callback then logs into ``state.log_history``).

    Raises:
        TrainerNotFoundError: ``distributed`` and no Trainer was bound or found.
    """
    if bound is not None:
        return bound
    trainer = find_trainer(max_depth)
    if trainer is None and (_multi_process() if distributed is None else distributed):
        raise TrainerNotFoundError(
            "CompreSSMCallback runs under torch.distributed (world_size > 1) but found no transformers.Trainer on "
            "the call stack: after a cut it could not rebuild DDP and the ranks would silently diverge. Call "
            "CompreSSMCallback.bind(trainer) before trainer.train()"
        )
    return trainer


def fsdp_version(trainer, args) -> int | None:
    """The FSDP version of the run (1 or 2), or None without FSDP."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) or plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1) or 1)
    if args is not None and getattr(args, "fsdp", None):  # [] / "" / None when off
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))  # transformers' default: 2
    return None


def unsupported_wrapper(trainer, args) -> str | None:
    """``"FSDP1"``/``"DeepSpeed"`` if the run flattens parameters (which the callback cannot resize), else None.

    FSDP2 (``fully_shard``: one ``DTensor`` per parameter) is supported (:mod:`compressm_hf.trainer.fsdp2`)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed"
    if args is not None and (getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None)):
        return "DeepSpeed"
    return "FSDP1" if fsdp_version(trainer, args) == 1 else None


def refuse_unsupported_wrapper(trainer, args) -> None:
    """Raise ValueError (with the way out) if the run uses FSDP1 or DeepSpeed (see :func:`unsupported_wrapper`)."""
    kind = unsupported_wrapper(trainer, args)
    if kind is None:
        return
    raise ValueError(
        f"CompreSSMCallback cannot run under {kind}: {kind} flattens the parameters into shared buffers and owns "
        "the optimizer state, so one layer cannot change its state size in the middle of training. FSDP2 can: "
        "set fsdp_config={'version': 2} (accelerate: fsdp_version: 2), or use DDP (torchrun --nproc_per_node N, "
        "accelerate launch --multi_gpu) or a single process. To continue under "
        f"{kind} anyway: run the compression phase (by default the first 10% of the steps) under DDP or FSDP2, "
        "save a checkpoint after the last cut, then Model.from_pretrained(checkpoint) builds the compressed "
        "shapes (config.state_sizes); train it on without CompreSSMCallback."
    )
