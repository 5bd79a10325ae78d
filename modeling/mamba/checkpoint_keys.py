"""Checkpoint-key rules shared by the CompreSSM models (tied ``lm_head``, peft-wrapped checkpoints).

``modeling/lru/checkpoint_keys.py`` is a symbolic link to this file: a modeling file copied next to a
saved model for ``trust_remote_code`` may only import same-folder modules, so each model folder needs the
file beside it, and ``save_pretrained`` copies its content. Imports nothing but the standard library.
"""

from __future__ import annotations

# peft puts the wrapped layer under this name (`x_proj.weight` -> `x_proj.base_layer.weight`)
_WRAPPED = ".base_layer."


class AdapterWrappedCheckpointError(ValueError):
    """A checkpoint was saved from a model with peft adapters injected (``get_base_model().save_pretrained()``):
    its layers sit under ``<name>.base_layer``, so loading it into the plain model would re-initialize them."""


class CompressedAdapterMismatchError(ValueError):
    """An adapter trained on a compressed model is being loaded into a model of other state sizes, and the
    adapter file does not carry the reduced SSM tensors to resize it (saved by plain peft, without
    ``compressm_hf.trainer.peft_io``)."""


def compressed_adapter_mismatch(key: str, found, expected) -> CompressedAdapterMismatchError:
    """The error for adapter tensor ``key`` of shape ``found`` where the model has ``expected`` (shapes)."""
    return CompressedAdapterMismatchError(
        f"{key} has shape {list(found)} in the adapter but {list(expected)} in the model: the adapter was trained "
        f"on a model whose SSM layers were compressed (CompreSSMCallback), and this model has other state sizes. "
        f"The adapter file does not hold the reduced SSM tensors, so the model cannot be resized from it. Load "
        f"the adapter onto the compressed base it was trained with, or re-save it from the trained PeftModel "
        f"with compressm_hf.trainer.peft_io.save_compressed_adapter(peft_model, folder) (what trainer.save_model "
        f"does under CompreSSMCallback), which stores the reduced tensors so that "
        f"PeftModel.from_pretrained(original_base, folder) resizes the base; or merge it "
        f"(peft_model.merge_and_unload().save_pretrained(folder))."
    )


def drop_tied_missing_keys(model, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: a tied target (``lm_head.weight``) is not missing when its source loaded.

    transformers never writes a tied parameter (``lm_head.weight`` *is* the embedding matrix), so
    ``model.load_state_dict(saved)`` -- e.g. in ``Trainer`` when resuming -- would report it missing and the
    Trainer would warn on every resume. Only keys that are tied right now (the same tensor as their source,
    ``model.all_tied_weights_keys``) and whose source was loaded are removed; an untied ``lm_head`` that is
    absent stays reported. Keys are matched as suffixes, so this also works when ``model`` sits inside a
    wrapper (peft's ``base_model.model.`` prefix). Modifies ``incompatible_keys.missing_keys`` in place
    (torch applies ``strict`` after the hooks).
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = incompatible_keys.missing_keys
    if not tied or not missing:
        return
    for target, source in tied.items():
        try:
            if model.get_parameter(target) is not model.get_parameter(source):
                continue  # not tied at the moment: a missing target is really missing
        except AttributeError:
            continue
        hits = [k for k in missing if k == target or k.endswith("." + target)]
        for key in hits:
            prefix = key[: len(key) - len(target)]
            if prefix + source not in missing:
                missing.remove(key)


def refuse_adapter_wrapped_checkpoint(
    model, missing_keys, unexpected_keys, source: str = "the checkpoint"
) -> None:
    """Raise :class:`AdapterWrappedCheckpointError` when ``missing_keys`` would be re-initialized although the
    checkpoint holds them under peft's ``<name>.base_layer.<param>`` layout.

    Args:
        model: the model being loaded (for the shapes in the message).
        missing_keys, unexpected_keys: iterables of parameter names (``str``), as transformers' loading report.
        source: where the weights come from (a folder name), for the message.
    """
    missing = set(missing_keys)
    wrapped = sorted(k for k in unexpected_keys if _WRAPPED in k and k.replace(_WRAPPED, ".") in missing)
    if not wrapped:
        return
    lines = []
    for key in wrapped[:4]:
        plain = key.replace(_WRAPPED, ".")
        try:
            shape = list(model.get_parameter(plain).shape)
        except AttributeError:
            shape = "?"
        lines.append(f"{plain} (shape {shape} in the model; the checkpoint has it as {key})")
    more = f" and {len(wrapped) - 4} more" if len(wrapped) > 4 else ""
    raise AdapterWrappedCheckpointError(
        f"{source} was saved from a model with peft adapters injected (e.g. get_base_model().save_pretrained() "
        f"on a PeftModel): its layers are stored under '.base_layer.', so loading it into "
        f"{type(model).__name__} would re-initialize {'; '.join(lines)}{more}. Save a plain "
        f"model with peft_model.merge_and_unload().save_pretrained(folder), or save the adapter with "
        f"trainer.save_model(folder) / peft_model.save_pretrained(folder) and load it with "
        f"PeftModel.from_pretrained(base_model, folder), where base_model is the model the adapter was created on "
        f"(at its original state sizes: a compressed adapter carries the reduced SSM tensors and resizes it)."
    )


__all__ = [
    "AdapterWrappedCheckpointError",
    "CompressedAdapterMismatchError",
    "compressed_adapter_mismatch",
    "drop_tied_missing_keys",
    "refuse_adapter_wrapped_checkpoint",
]
