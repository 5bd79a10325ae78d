"""The model ``compressm-train`` trains: a new byte-level model of ``--architecture`` from the size
arguments (each architecture's config fields come from :data:`_CONFIG_KWARGS`), or a saved folder."""

from __future__ import annotations

from compressm_hf.cli.architectures import ARCHITECTURE_TABLE, load_causal_lm

__all__ = ["build_model", "new_model_config", "state_sizes"]


def _mamba_config_kwargs(model_args) -> dict:
    # byte 0 is pad, bos and eos of the byte-level Mamba LMs (the tokenizer saved beside them says so)
    return {
        "expand": model_args.expand or 2,
        "conv_kernel": model_args.conv_kernel,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def _mamba2_config_kwargs(model_args) -> dict:
    """Mamba-2: the Mamba kwargs plus the head layout; ``num_heads`` defaults to ``d_inner / head_dim``."""
    kwargs = _mamba_config_kwargs(model_args)
    d_inner = kwargs["expand"] * model_args.hidden_size
    if model_args.num_heads is None and d_inner % model_args.head_dim != 0:
        raise ValueError(
            f"--head_dim {model_args.head_dim} does not divide d_inner = expand * hidden_size = "
            f"{kwargs['expand']} * {model_args.hidden_size} = {d_inner}; pick a divisor of {d_inner} (e.g. 32)"
        )
    num_heads = model_args.num_heads or d_inner // model_args.head_dim
    if num_heads * model_args.head_dim != d_inner:
        raise ValueError(
            f"--num_heads {num_heads} * --head_dim {model_args.head_dim} = {num_heads * model_args.head_dim} must "
            f"equal d_inner = expand * hidden_size = {d_inner} (leave --num_heads out to derive it)"
        )
    if num_heads % model_args.n_groups != 0:
        raise ValueError(
            f"--n_groups {model_args.n_groups} must divide the number of heads ({num_heads} = d_inner {d_inner} "
            f"/ head_dim {model_args.head_dim}): each group's B and C are shared by num_heads / n_groups heads"
        )
    return {
        **kwargs,
        "head_dim": model_args.head_dim,
        "num_heads": num_heads,
        "n_groups": model_args.n_groups,
        "chunk_size": model_args.chunk_size,
    }


def _lru_config_kwargs(model_args) -> dict:
    return {
        k: getattr(model_args, k) for k in ("expand", "r_min", "r_max") if getattr(model_args, k) is not None
    }


# --architecture -> the config fields of that architecture (the shared ones are set by new_model_config)
_CONFIG_KWARGS = {
    "mamba": _mamba_config_kwargs,
    "mamba2": _mamba2_config_kwargs,
    "lru": _lru_config_kwargs,
}


def new_model_config(model_args):
    """The config of a new byte-level model (vocabulary 256) of ``--architecture`` from the size arguments.

    Raises:
        ValueError: sizes the architecture does not accept (the message names the flag and what is allowed).
    """
    config_class, _ = ARCHITECTURE_TABLE[model_args.architecture].classes()
    return config_class(
        vocab_size=256,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        state_size=model_args.state_size,
        **_CONFIG_KWARGS[model_args.architecture](model_args),
    )


def build_model(model_args):
    """A new byte-level model from the size arguments, or the folder of ``--model_name_or_path``."""
    if model_args.model_name_or_path is not None:
        model, kind = load_causal_lm(model_args.model_name_or_path)
        model_args.architecture = kind
        return model
    _, model_class = ARCHITECTURE_TABLE[model_args.architecture].classes()
    return model_class(new_model_config(model_args))


def state_sizes(model) -> list[int]:
    """The state size of every reducible layer, in order."""
    from compressm_hf import find_reducible_layers

    return [int(layer.state_size) for layer in find_reducible_layers(model)]
