"""``compressm-train``: train a byte-level SSM language model and compress it while it trains.

``compressm-train --output_dir outputs/shakespeare-mamba`` (``make train``) trains a small Mamba on
Shakespeare's works on the CPU in a few minutes (``--architecture mamba2`` or ``lru`` for the others; every
architecture is a row of :data:`compressm_hf.cli.ARCHITECTURE_TABLE` and its config fields come from
:data:`_CONFIG_KWARGS`). A :class:`~compressm_hf.CompreSSMCallback` shrinks every
layer's state early in training; at the end the script prints a summary (state sizes before -> after,
validation perplexity, training tokens/s before and after compression, wall time) and leaves a loadable
model folder with its compression report, plots and model card.

Arguments are parsed by ``transformers.HfArgumentParser`` over four dataclasses (:mod:`.train_args`):
:class:`ModelArguments`, :class:`CompressionArguments` (the fields of :class:`~compressm_hf.CompreSSMConfig`),
:class:`DataArguments` and ``transformers.TrainingArguments``, so every
familiar Trainer flag works (``--max_steps``, ``--learning_rate``, ``--per_device_train_batch_size``,
``--report_to``, ``--push_to_hub``, ``--hub_model_id``, ``--resume_from_checkpoint`` ...). Only some
Trainer defaults differ (see :data:`TRAINING_DEFAULTS`). The compression defaults are the library's
(``CompreSSMConfig``, from :mod:`compressm_hf.trainer.defaults`, the paper's). ``--help`` lists the model, compression and data
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

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from transformers import Trainer, TrainingArguments

from compressm_hf.cli.clock import WallClock
from compressm_hf.cli.train_args import (
    COMPRESSION_OVERRIDES,
    TRAINING_DEFAULTS,
    CompressionArguments,
    DataArguments,
    ModelArguments,
    build_parser,
    make_callback,
    parse_args,
)
from compressm_hf.cli.train_data import hub_dataset_names, load_splits, tokens_per_step
from compressm_hf.cli.train_logging import LOG_NAME, JsonlLogger, configure_logging, time_line
from compressm_hf.cli.train_model import build_model, new_model_config, state_sizes
from compressm_hf.cli.train_record import RECORD_NAME, data_source_kind
from compressm_hf.cli.train_summary import (
    SUMMARY_NAME,
    build_summary,
    dataset_description,
    perplexity_of,
    public_path,
)
from compressm_hf.cli.write_safety import WriteFailedError, disk_full_as_error
from compressm_hf.trainer.report import REPORT_NAME
from compressm_hf.trainer.timing import StepTimer, add_timing_to_report, run_timing

__all__ = [
    "COMPRESSION_OVERRIDES",
    "LOG_NAME",
    "SUMMARY_NAME",
    "TRAINING_DEFAULTS",
    "CompressionArguments",
    "DataArguments",
    "JsonlLogger",
    "ModelArguments",
    "StepTimer",
    "WriteFailedError",
    "build_model",
    "build_parser",
    "build_summary",
    "disk_full_as_error",
    "main",
    "make_callback",
    "new_model_config",
    "parse_args",
    "public_path",
    "time_line",
]

logger = logging.getLogger("compressm_hf.cli.train")


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
    configure_logging(training_args)
    # the Trainer pickles its args into every training_args.bin: keep the token in the environment only
    hub_token = protect_hub_token(training_args)
    with disk_full_as_error(training_args.output_dir):
        return _train(model_args, comp_args, data_args, training_args, hub_token=hub_token, clock=clock)


def _train(
    model_args, comp_args, data_args, training_args, *, hub_token: str | None, clock: WallClock
) -> int:
    """The run, in steps: data and model, the Trainer, training and the final evaluation, the summary, the
    saved folder (weights, tokenizer, card, summary, record), the push."""
    from transformers import set_seed

    set_seed(training_args.seed)
    splits = load_splits(data_args)
    model = build_model(model_args)
    sizes_before = state_sizes(model)
    _announce(model, model_args, data_args, training_args, splits, sizes_before)
    run = _build_trainer(model, comp_args, data_args, training_args, splits)
    t_train = time.perf_counter()
    train_result = run.trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_time = time.perf_counter() - t_train
    eval_metrics = _final_evaluation(run.trainer, train_result, training_args)
    outcome = _outcome(run, model, sizes_before)
    summary = build_summary(
        output_dir=training_args.output_dir,
        architecture=model_args.architecture,
        dataset=data_args.dataset,
        sizes_before=sizes_before,
        sizes_after=outcome["sizes_after"],
        eval_history=outcome["eval_history"],
        final_eval_loss=eval_metrics.get("eval_loss"),
        rate_before=outcome["rate_before"],
        rate_after=outcome["rate_after"],
        compressed=run.compress_cb is not None,
        cut_steps=outcome["cut_steps"],
        wall_time=clock.elapsed(),
        wall_covers=clock.covers,
        train_time=train_time,
        max_steps=run.trainer.state.max_steps,
        tokens_trained=run.tokens_per_step * int(run.trainer.state.global_step),
        timing=outcome["timing"],
    )
    card_kwargs = _card_kwargs(run, eval_metrics, train_result, outcome, data_args, training_args, summary)
    last_line = lambda: time_line(train_time, clock.elapsed(), clock.covers)
    _save_outputs(
        run,
        model,
        (model_args, comp_args, data_args),
        training_args,
        outcome,
        card_kwargs,
        summary,
        last_line,
    )
    return _push(run, training_args, hub_token)


def _announce(model, model_args, data_args, training_args, splits, sizes_before) -> None:
    """One line on the main process: the model, the data, the run length and the output folder."""
    if training_args.process_index != 0:
        return
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"compressm-train: {model_args.architecture} ({model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, state sizes {sizes_before}, {n_params:,} parameters) on "
        f"{data_args.dataset} ({len(splits['train']):,} train / {len(splits['validation']):,} validation "
        f"blocks of {data_args.block_size} bytes), {training_args.max_steps} steps -> {training_args.output_dir}",
        flush=True,
    )


class _Run:
    """What the steps of :func:`_train` share: the Trainer and its callbacks."""

    def __init__(
        self, trainer, compress_cb, hub_cb, timer, tokens_per_step: int, dataset_names, repo_id: str
    ):
        self.trainer, self.compress_cb, self.hub_cb, self.timer = trainer, compress_cb, hub_cb, timer
        self.tokens_per_step, self.dataset_names, self.repo_id = tokens_per_step, dataset_names, repo_id


def _build_trainer(model, comp_args, data_args, training_args, splits) -> _Run:
    """The Trainer with the step timer, the JSONL log, the CompreSSM callback (unless ``--no_compression``)
    and, with ``--push_to_hub``, the Hub callback; a resume first sets half-written checkpoints aside."""
    from compressm_hf.trainer.hub import CompreSSMHubCallback, hub_errors

    compress_cb = None if comp_args.no_compression else make_callback(comp_args, seed=training_args.seed)
    per_step = tokens_per_step(data_args, training_args)
    timer = StepTimer(model, per_step)
    callbacks = [timer, JsonlLogger(Path(training_args.output_dir) / LOG_NAME)]
    if compress_cb is not None:
        callbacks.append(compress_cb)
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
    dataset_names = hub_dataset_names(data_args.dataset)
    hub_cb = (
        CompreSSMHubCallback.attach(trainer, dataset_names=dataset_names)
        if training_args.push_to_hub
        else None
    )
    return _Run(trainer, compress_cb, hub_cb, timer, per_step, dataset_names, repo_id)


def _set_aside_incomplete_checkpoints(training_args: TrainingArguments) -> None:
    """Before a resume: rename half-written ``checkpoint-N`` folders (main process; nothing is deleted)."""
    from compressm_hf.trainer.checkpoints import quarantine_incomplete_checkpoints

    if training_args.process_index != 0:
        return
    for old, new in quarantine_incomplete_checkpoints(training_args.output_dir):
        print(
            f"compressm-train: {old} is an incomplete checkpoint (its run was killed while saving): "
            f"renamed to {Path(new).name}",
            flush=True,
        )


def _final_evaluation(trainer, train_result, training_args) -> dict:
    """Evaluate once more (the summary needs it; ``--eval_strategy`` sets the evaluations during training), log
    and save the eval and train metrics and the trainer state (without a local path)."""
    eval_metrics = trainer.evaluate()
    if "eval_loss" in eval_metrics:
        eval_metrics["eval_perplexity"] = perplexity_of(eval_metrics["eval_loss"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if trainer.state.best_model_checkpoint:  # output_dir/trainer_state.json is pushed: no local path in it
        trainer.state.best_model_checkpoint = public_path(
            trainer.state.best_model_checkpoint, training_args.output_dir
        )
    trainer.save_state()
    return eval_metrics


def _outcome(run: _Run, model, sizes_before: list[int]) -> dict:
    """Sizes after, the steps that cut, throughput before/after compression, the evaluations and the timing."""
    compress_cb, timer = run.compress_cb, run.timer
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
        (int(e["step"]), float(e["eval_loss"])) for e in run.trainer.state.log_history if "eval_loss" in e
    ]
    return {
        "sizes_after": state_sizes(model),
        "cut_steps": cut_steps,
        "rate_before": rate_before,
        "rate_after": rate_after,
        # the final evaluate() repeats the last scheduled one at the same step: keep one per step
        "eval_history": list(dict(eval_history).items()),
        "timing": run_timing(
            timer.records, compress_cb.history if compress_cb is not None else [], skip_first=timer.skip_first
        ),
    }


def _card_kwargs(run: _Run, eval_metrics, train_result, outcome, data_args, training_args, summary) -> dict:
    """The model card's metrics, data and training description."""
    card_metrics = {
        k: v for k, v in eval_metrics.items() if k in ("eval_loss", "eval_perplexity") and v is not None
    }
    if "train_loss" in train_result.metrics:
        card_metrics["train_loss"] = train_result.metrics["train_loss"]
    for label, (value, _) in (
        ("train tokens/s before compression", outcome["rate_before"]),
        ("train tokens/s after compression", outcome["rate_after"]),
    ):
        if value is not None and run.compress_cb is not None:
            card_metrics[label] = round(value)
    data_md = dataset_description(data_args.dataset, training_args.output_dir)
    max_steps = run.trainer.state.max_steps
    training_md = (
        f"Trained with `compressm-train` on {data_md} (byte-level, blocks of {data_args.block_size} bytes) "
        f"for {max_steps} steps.\n\n```text\n{summary}\n```"
    )
    return {
        "metrics": card_metrics,
        "dataset_names": run.dataset_names,
        "training_summary": training_md,
        "max_steps": max_steps,
    }


def _save_outputs(
    run: _Run, model, arguments, training_args, outcome, card_kwargs, summary, last_line
) -> None:
    """Weights (every process joins), then on the main process: tokenizer, timing in the report, the card,
    ``training_summary.txt`` (its last line from ``last_line()``, so the wall time covers the saving) and
    ``compressm_train_args.json`` (``arguments``: the model, compression and data arguments)."""
    trainer, compress_cb, hub_cb = run.trainer, run.compress_cb, run.hub_cb
    model_args, comp_args, data_args = arguments
    out = Path(training_args.output_dir)
    # the Trainer's own push_to_hub would upload training_args.bin: save here, push below without it
    trainer.save_model(training_args.output_dir, _internal_call=True)
    if not trainer.is_world_process_zero():
        return
    from compressm_hf.modeling import CompreSSMByteTokenizer

    CompreSSMByteTokenizer.for_model_config(model.config).save_pretrained(out)  # the data are bytes
    if compress_cb is not None:  # before the card and the push read the report
        add_timing_to_report(out / compress_cb.report_name, outcome["timing"])
    if hub_cb is not None:
        hub_cb.card_kwargs.update(card_kwargs)
        model_name = (training_args.hub_model_id or out.name).split("/")[-1]
        # the Trainer's draft, then the CompreSSM card, plots and report (CompreSSMHubCallback.bind)
        trainer.create_model_card(model_name=model_name)
    else:
        from compressm_hf.trainer.model_card import write_model_card

        report = out / (compress_cb.report_name if compress_cb is not None else REPORT_NAME)
        write_model_card(out, report=report if report.is_file() else None, model_name=out.name, **card_kwargs)
    summary = summary.rsplit("\n", 1)[0] + "\n" + last_line()
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


def _push(run: _Run, training_args, hub_token: str | None) -> int:
    """With ``--push_to_hub``, upload the folder (without ``training_args.bin``); 1 if that failed, else 0."""
    from compressm_hf.trainer.hub import CompreSSMHubError, push_compressed_model

    trainer = run.trainer
    if run.hub_cb is None or not trainer.is_world_process_zero():
        return 0
    target = getattr(trainer, "hub_model_id", None) or run.repo_id
    getattr(trainer, "_finish_current_push", lambda: None)()  # checkpoint pushes of other hub_strategy
    try:
        push_compressed_model(
            Path(training_args.output_dir),
            target,
            token=hub_token,
            private=training_args.hub_private_repo,
            commit_message="End of training",
            revision=training_args.hub_revision,
        )
    except (CompreSSMHubError, ValueError) as err:  # ValueError: a file holds a secret, nothing was sent
        print(
            f"compressm-train: error: the model was saved in {training_args.output_dir} but {err}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
