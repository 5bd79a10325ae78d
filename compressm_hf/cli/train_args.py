"""The arguments of ``compressm-train``: four dataclasses parsed by ``transformers.HfArgumentParser``
(:class:`ModelArguments`, :class:`CompressionArguments`, :class:`DataArguments`, ``TrainingArguments``), the
Trainer defaults that differ from transformers' (:data:`TRAINING_DEFAULTS`), and the checks that turn bad
input into a usage error.

:class:`CompressionArguments` *is* :class:`~compressm_hf.CompreSSMConfig` (a subclass adding
``--no_compression``): ``--help`` documents every compression setting from the config's field help, with
the library's defaults. Two settings come from the Trainer's own flags instead: ``seed`` (``--seed``) and
``greater_is_better`` (pragmatic mode reads ``--greater_is_better`` when it compares
``--metric_for_best_model``). :data:`COMPRESSION_OVERRIDES` lists where the CLI's compression defaults differ
from the library's (none today: ``defaults.CLI_TAU`` is ``defaults.TAU``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from compressm_hf.cli.architectures import ARCHITECTURES
from compressm_hf.cli.helptext import HelpFormatter, as_flags, examples_epilog, plain_help
from compressm_hf.cli.train_model import new_model_config
from compressm_hf.settings import CompreSSMConfig, InvalidSettingError
from compressm_hf.trainer import defaults

__all__ = [
    "COMPRESSION_OVERRIDES",
    "TRAINER_OWNED_SETTINGS",
    "TRAINING_DEFAULTS",
    "CompressionArguments",
    "DataArguments",
    "ModelArguments",
    "build_parser",
    "make_callback",
    "parse_args",
]


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


# CompreSSMConfig fields the CLI takes from TrainingArguments' flag of the same name (HfArgumentParser cannot
# parse one flag into two dataclasses)
TRAINER_OWNED_SETTINGS = ("seed", "greater_is_better")
# compression defaults of compressm-train that differ from CompreSSMConfig's: none (CLI_TAU is TAU); an entry
# here is the one place such a difference would be made (and documented)
COMPRESSION_OVERRIDES: dict = {}


@dataclass
class CompressionArguments(CompreSSMConfig):
    """How CompreSSM compresses the model while it trains: every :class:`~compressm_hf.CompreSSMConfig` field
    (same names, help and defaults, validated the same way), plus ``--no_compression``; ``seed`` and
    ``greater_is_better`` come from the Trainer's flags (:data:`TRAINER_OWNED_SETTINGS`)."""

    _argument_group_name = "compression (CompreSSM, applied while training)"

    seed: int = field(default=defaults.SEED, init=False, metadata={"help": "From --seed."})
    greater_is_better: bool | None = field(
        default=None, init=False, metadata={"help": "From --greater_is_better."}
    )
    no_compression: bool = field(
        default=False, metadata={"help": "Train without the CompreSSM callback (the baseline)."}
    )

    def to_config(self, seed: int = 0) -> CompreSSMConfig:
        """The library config of these arguments, with the Trainer's ``seed``."""
        names = [f.name for f in fields(CompreSSMConfig) if f.name not in TRAINER_OWNED_SETTINGS]
        return CompreSSMConfig(**{name: getattr(self, name) for name in names}, seed=int(seed))


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
        try:
            model_args, comp_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        except InvalidSettingError as err:  # CompressionArguments validates itself (as CompreSSMConfig)
            parser.error(f"invalid compression arguments: {as_flags(err)}")
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
    from compressm_hf.trainer.checkpoints import is_complete_checkpoint, last_complete_checkpoint

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
    if not comp_args.no_compression and comp_args.steps is not None:  # the settings were checked at parsing
        late = [s for s in comp_args.steps if s > training_args.max_steps]
        if late:
            parser.error(f"--steps {late} are beyond --max_steps {training_args.max_steps}")


def make_callback(comp_args: CompressionArguments, seed: int = 0):
    """``CompreSSMCallback(comp_args.to_config(seed))``."""
    from compressm_hf import CompreSSMCallback

    return CompreSSMCallback(comp_args.to_config(seed=seed))
