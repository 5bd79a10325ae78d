"""Saving peft adapters trained on a model that CompreSSM compressed, so that they load back with peft alone.

Under LoRA the base model is frozen, but a compression event still changes it: every reduced layer's
state-size-dependent tensors (Mamba: ``A_log``, ``x_proj``; LRU: ``nu_log``, ``theta_log``, ``gamma_log``,
``B_*``, ``C_*``) are sliced or re-balanced, and ``lora_B`` of an adapter on ``x_proj`` loses rows with them.
peft's ``save_pretrained`` writes only adapter tensors, so such an adapter fits neither the original base (wrong
shapes, or right shapes and silently wrong values) nor anything else.

:func:`save_compressed_adapter` writes the adapter as peft does and adds the base's state-size-dependent
tensors to the adapter weights file, under the keys of the peft model's own state dict
(``base_model.model.<...>.A_log``, ``<...>.x_proj.base_layer.weight``). peft passes keys that are not adapter
weights through to ``load_state_dict``, where each CompreSSM mixer resizes itself to the stored shape before
loading, so the ordinary peft calls restore the trained model exactly::

    base = AutoModelForCausalLM.from_pretrained(original_base)  # the model the adapter was created on
    model = PeftModel.from_pretrained(base, folder)  # layers shrink to the adapter's sizes

:class:`~compressm_hf.trainer.CompreSSMCallback` calls :func:`enable_compressed_adapter_saving` on a peft model
at train begin, so ``trainer.save_model(folder)`` and every checkpoint write such adapters (and
``trainer.train(resume_from_checkpoint=...)`` resumes them).
"""

from __future__ import annotations

import copy
import json
import os
import types

import torch

from compressm_hf.protocol import find_reducible_layers

ADAPTER_SAFE_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_WRAPPED = ".base_layer."
_MARK = "_compressm_saves_reduced_base"

__all__ = [
    "enable_compressed_adapter_saving",
    "is_peft_model",
    "reduced_base_tensors",
    "save_compressed_adapter",
    "state_dependent_keys",
]


def is_peft_model(model) -> bool:
    """True for a peft ``PeftModel`` (duck-typed: a ``peft_config`` dict and ``get_base_model()``)."""
    return isinstance(getattr(model, "peft_config", None), dict) and callable(
        getattr(model, "get_base_model", None)
    )


def state_dependent_keys(base_model: torch.nn.Module) -> set[str]:
    """Names (plain, as in ``base_model.state_dict()`` without adapters) of the tensors whose shape depends on
    the per-layer state sizes.

    Found structurally: the same class is built on the meta device (no memory, no init) with every entry of
    ``config.state_sizes`` one larger, and the keys whose shapes differ from ``base_model``'s are returned.
    Empty for a model without ``config.state_sizes``.
    """
    config = getattr(base_model, "config", None)
    sizes = getattr(config, "state_sizes", None)
    if not sizes:
        return set()
    probe_config = copy.deepcopy(config)
    probe_config.state_sizes = [int(n) + 1 for n in sizes]
    if hasattr(probe_config, "state_size"):
        probe_config.state_size = max(probe_config.state_sizes)
    with torch.device("meta"):
        probe = type(base_model)(probe_config)
    current = {_plain_key(k): v.shape for k, v in base_model.state_dict().items()}
    return {k for k, v in probe.state_dict().items() if k in current and current[k] != v.shape}


def _plain_key(key: str) -> str:
    """``base_model.model.a.x_proj.base_layer.weight`` (peft) -> ``a.x_proj.weight`` (plain model)."""
    return key.removeprefix(_PEFT_PREFIX).replace(_WRAPPED, ".")


def _was_compressed(config) -> bool:
    record = getattr(config, "compression", None) or {}
    original = record.get("original_sizes") if isinstance(record, dict) else None
    return original is not None and [int(n) for n in original] != [int(n) for n in config.state_sizes]


def reduced_base_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The base tensors a compressed peft model's adapter must carry: ``{peft state-dict key: tensor}``.

    Keys are those of ``peft_model.state_dict()`` (e.g. ``base_model.model.backbone.layers.0.mixer.A_log``,
    ``...mixer.x_proj.base_layer.weight``), values detached contiguous CPU copies (the parameter's dtype).
    Empty unless the base was compressed (``config.compression["original_sizes"]`` differs from
    ``config.state_sizes``), so an adapter of an uncompressed run stays a plain peft adapter.

    Raises:
        TypeError: ``peft_model`` is not a peft model.
    """
    if not is_peft_model(peft_model):
        raise TypeError(
            f"reduced_base_tensors expects a peft PeftModel, got {type(peft_model).__name__}; for a plain "
            f"model use save_pretrained (it stores the compressed sizes in config.json)."
        )
    base = peft_model.get_base_model()
    if not find_reducible_layers(base) or not _was_compressed(base.config):
        return {}
    wanted = state_dependent_keys(base)
    return {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in peft_model.state_dict().items()
        if _plain_key(key) in wanted
    }


def _adapter_dirs(save_directory: str, peft_model, selected_adapters) -> list[str]:
    """The folders peft writes each adapter to: ``save_directory`` for ``default``, a subfolder otherwise."""
    names = list(selected_adapters) if selected_adapters is not None else list(peft_model.peft_config)
    return [save_directory if name == "default" else os.path.join(save_directory, name) for name in names]


def _add_to_weights_file(folder: str, tensors: dict[str, torch.Tensor], sizes: list[int]) -> None:
    safe = os.path.join(folder, ADAPTER_SAFE_WEIGHTS)
    plain = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(safe):
        from safetensors.torch import load_file, save_file

        merged = {**load_file(safe), **tensors}
        tmp = safe + ".tmp"
        save_file(merged, tmp, metadata={"format": "pt", "compressm_state_sizes": json.dumps(sizes)})
        os.replace(tmp, safe)
    elif os.path.isfile(plain):
        merged = {**torch.load(plain, map_location="cpu", weights_only=True), **tensors}
        tmp = plain + ".tmp"
        torch.save(merged, tmp)
        os.replace(tmp, plain)
    else:
        raise FileNotFoundError(
            f"peft wrote no {ADAPTER_SAFE_WEIGHTS} or {ADAPTER_WEIGHTS} in {folder!r}; cannot add the reduced "
            f"SSM tensors the adapter needs to load onto its original base."
        )


def save_compressed_adapter(peft_model, save_directory, **kwargs) -> None:
    """``peft_model.save_pretrained(save_directory, **kwargs)`` plus the reduced base tensors.

    Args:
        peft_model: a peft ``PeftModel`` whose base holds CompreSSM layers (compressed or not).
        save_directory: output folder (``str`` or ``os.PathLike``).
        **kwargs: passed to peft's ``save_pretrained`` (``selected_adapters``, ``safe_serialization``,
            ``is_main_process``, ...). Only the main process rewrites the files.

    The folder is an ordinary peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``);
    its weights file also holds :func:`reduced_base_tensors` (metadata ``compressm_state_sizes``), so
    ``PeftModel.from_pretrained(original_base, save_directory)`` resizes the base and reproduces the trained
    model. For an uncompressed base the output is exactly peft's.
    """
    if not is_peft_model(peft_model):
        raise TypeError(
            f"save_compressed_adapter expects a peft PeftModel, got {type(peft_model).__name__}; a plain model "
            f"is saved with save_pretrained."
        )
    save_directory = os.fspath(save_directory)
    type(peft_model).save_pretrained(peft_model, save_directory, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    tensors = reduced_base_tensors(peft_model)
    if not tensors:
        return
    sizes = [int(n) for n in peft_model.get_base_model().config.state_sizes]
    for folder in _adapter_dirs(save_directory, peft_model, kwargs.get("selected_adapters")):
        _add_to_weights_file(folder, tensors, sizes)


def _save_pretrained(self, save_directory, **kwargs) -> None:
    save_compressed_adapter(self, save_directory, **kwargs)


def enable_compressed_adapter_saving(model) -> bool:
    """Make ``model.save_pretrained`` (and so ``Trainer.save_model`` and checkpoints) write
    :func:`save_compressed_adapter`'s output. Idempotent; a no-op (returns False) unless ``model`` is a peft
    model. Sets an instance attribute only: the class and other instances are untouched."""
    if not is_peft_model(model):
        return False
    if not getattr(model, _MARK, False):
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained, model))
        object.__setattr__(model, _MARK, True)
    return True
