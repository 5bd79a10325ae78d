"""CompreSSM against the alternatives users weigh it against, on one task, one step budget, same seeds.

Methods (``--methods``, any subset):

==================  =====================================================================================
``full``            the uncompressed model (``n0`` states per layer); also the teacher of kd / lora_kd and
                    the starting point of the rewinding methods
``compressm``       ``CompreSSMCallback(tau)`` for every ``tau`` in ``--taus`` (attempts in the first 10%), and
                    ``CompreSSMCallback(target_total_state=--budget)`` when ``--budget`` is given
``scratch_small``   from scratch at the sizes CompreSSM reached (with ``--budget``), else at ``--target-tau``
``kd``              the scratch_small model distilled from ``full`` (alpha 0.5, T 2); time includes the teacher
``hnn``             full-size model + ``hnn_lambda * sum(sigma)`` each step, balanced truncation at ``--hnn-tau``
                    (with ``--budget``: at the shared tau that gives CompreSSM's total state size)
``grad_prune``      ``|grad x param|`` state pruning to the target sizes, events every ``k`` steps in the
                    same window as CompreSSM (first 10%)
``rewind_lr``       ``full`` -> cut to the target sizes (modal Hankel importance) -> retrain
                    ``--retrain-fraction * T`` steps with the LR schedule rewound (Renda et al. 2020)
``rewind_weights``  same, but the weights go back to their values at step ``T - R`` (sliced) first
``lora_kd``         ``full`` cut to the target sizes, then only LoRA adapters + a hidden-state projection are
                    trained on KD + alignment MSE
==================  =====================================================================================

Every model is trained with the stock ``transformers.Trainer`` (or a subclass from
``compressm_hf.trainer.baselines``) for ``--max-steps`` optimizer steps, except the retraining of the rewinding
methods (``R`` steps after the full run). The wall-clock of a method counts everything it needs: kd, lora_kd and
rewinding include the full model's training time. Quality is test accuracy (classification) or validation
perplexity (``shakespeare``), read once at the end.

Tasks: ``fmnist4`` (sequential Fashion-MNIST pooled 4x: 49 steps; the default, as in
``benchmarks/bench_lru_compression.py``), ``fmnist2`` (196 steps), ``mnist1d`` (40 steps) and ``shakespeare``
(byte-level LM, ``LRUForCausalLM``).

Equal size (``--budget N``): CompreSSM runs with a global state budget of ``N`` states summed over the layers
(the callback finds each attempt's tau; see ``compressm_hf.budget``) and every baseline is built at the
per-layer sizes CompreSSM reached (HNN, which picks its own split, at the same total), so the whole table
compares methods at exactly equal size. Without ``compressm`` the baselines split ``N`` evenly over the layers.

Model (``--preset NAME``): the model configuration is ``LRUConfig.NAME(...)``, e.g.
``paper_sequence_classification`` (the official code's block: BatchNorm, hidden 8, 256 states, fan-in
uniform init); ``--state-size``, ``--hidden-size``, ``--layers``, ``--r-min``, ``--r-max`` and ``--max-phase``
override the preset only when given. ``--num-seeds K`` runs seeds ``0 .. K-1`` (instead of ``--seeds``); the
table adds the paper's top-3 mean when there are at least 3 seeds.

Outputs (``--out-dir``): ``benchmark_<task>.md`` (table), ``benchmark_<task>.json`` (every run + summaries) and
``benchmark_<task>.png`` (quality vs final mean state size; marker area ~ wall-clock).

Examples::

    python scripts/benchmark.py --quick                                    # ~2 min smoke run, every method
    python scripts/benchmark.py --task fmnist4 --seeds 0 1 --max-steps 300 --methods full compressm kd
    python scripts/benchmark.py --task shakespeare --methods full compressm scratch_small kd
    python scripts/benchmark.py --task mnist1d --preset paper_sequence_classification --budget 32 --num-seeds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ALL_METHODS = (
    "full",
    "compressm",
    "scratch_small",
    "kd",
    "hnn",
    "grad_prune",
    "rewind_lr",
    "rewind_weights",
    "lora_kd",
)
NEEDS_FULL = {"kd", "rewind_lr", "rewind_weights", "lora_kd"}
# model flags that a --preset keeps unless they are given (their values without a preset)
MODEL_DEFAULTS = {
    "state_size": 64,
    "hidden_size": 32,
    "layers": 2,
    "r_min": 0.5,
    "r_max": 0.99,
    "max_phase": math.pi / 10,
}
CONFIG_FIELDS = {"layers": "num_hidden_layers"}  # flag name -> LRUConfig field, where they differ

# ----------------------------------------------------------------------------------------------- data


def load_task(args):
    from compressm_hf.data import byte_lm_splits, fashion_mnist_splits, load_text, mnist1d_splits

    if args.task.startswith("fmnist"):
        pool = int(args.task[len("fmnist") :] or 1)
        ds = fashion_mnist_splits(max_train=args.max_train, max_test=args.max_test, pool=pool)
        eval_split = "test"
    elif args.task == "mnist1d":
        ds = mnist1d_splits(num_samples=10_000)
        ds["train"] = ds["train"].select(range(min(args.max_train, len(ds["train"]))))
        ds["test"] = ds["test"].select(range(min(args.max_test, len(ds["test"]))))
        eval_split = "test"
    elif args.task == "shakespeare":
        ds = byte_lm_splits(
            load_text("shakespeare"),
            block_size=args.block_size,
            max_train_blocks=args.max_train,
            max_validation_blocks=args.max_test,
        )
        eval_split = "validation"
    else:
        raise ValueError(f"unknown task {args.task!r}")
    ds.set_format("torch")
    return ds["train"], ds[eval_split]


def is_lm(args) -> bool:
    return args.task == "shakespeare"


def available_presets() -> list[str]:
    """The ``LRUConfig`` classmethods that build a preset (those the base config class does not have)."""
    from transformers import PretrainedConfig

    from compressm_hf.modeling.lru import LRUConfig

    own = vars(LRUConfig)
    return sorted(
        name
        for name, value in own.items()
        if isinstance(value, classmethod) and not name.startswith("_") and not hasattr(PretrainedConfig, name)
    )


def preset_config(args, num_labels: int):
    """``LRUConfig.<args.preset>(...)`` with the task's labels and the model flags given on the command line."""
    from compressm_hf.modeling.lru import LRUConfig

    overrides = {CONFIG_FIELDS.get(k, k): getattr(args, k) for k in args.model_overrides}
    return getattr(LRUConfig, args.preset)(num_labels=num_labels, **overrides)


def base_config(args, num_labels: int):
    from compressm_hf.modeling.lru import LRUConfig

    if args.preset is not None:
        return preset_config(args, num_labels)
    common = dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
        r_min=args.r_min,
        r_max=args.r_max,
        max_phase=args.max_phase,
        hidden_dropout=0.0,
    )
    if is_lm(args):
        return LRUConfig(vocab_size=256, **common)
    return LRUConfig(input_size=1, num_labels=num_labels, classifier_pooling="mean", **common)


def model_class(args):
    from compressm_hf.modeling.lru import LRUForCausalLM, LRUForSequenceClassification

    return LRUForCausalLM if is_lm(args) else LRUForSequenceClassification


def state_sizes(model) -> list[int]:
    from compressm_hf.protocol import find_reducible_layers

    return [int(layer.state_size) for layer in find_reducible_layers(model)]


# ------------------------------------------------------------------------------------------- training


def training_args(args, out_dir: str, seed: int, max_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(args.warmup * max_steps)),
        max_grad_norm=1.0,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        prediction_loss_only=is_lm(args),
    )


def evaluate_model(args, trainer) -> dict:
    metrics = trainer.evaluate()
    loss = float(metrics["eval_loss"])
    if is_lm(args):
        return {"quality": math.exp(min(loss, 50.0)), "eval_loss": loss}
    return {"quality": float(metrics["eval_accuracy"]), "eval_loss": loss}


def compute_metrics_fn(args):
    if is_lm(args):
        return None
    from compressm_hf.metrics import load_metric

    accuracy = load_metric("accuracy")

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics


def train(args, data, model, seed, *, max_steps=None, trainer_cls=None, callbacks=(), **trainer_kwargs):
    """Train ``model`` and evaluate it; returns (result dict, trainer). ``train_s`` excludes evaluation."""
    from transformers import Trainer

    trainer_cls = trainer_cls or Trainer
    max_steps = max_steps or args.max_steps
    train_ds, eval_ds = data
    with tempfile.TemporaryDirectory(prefix="compressm_bench_") as out_dir:
        trainer = trainer_cls(
            model=model,
            args=training_args(args, out_dir, seed, max_steps),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            compute_metrics=compute_metrics_fn(args),
            callbacks=list(callbacks),
            **trainer_kwargs,
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        report_path = Path(out_dir) / "compression_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        # HNN truncates inside train() when truncate_tau is set: evaluate the final (cut) model
        metrics = evaluate_model(args, trainer)
    return {"train_s": train_s, "report": report, **metrics}, trainer


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def split_budget(budget: int, layers: int) -> list[int]:
    """``budget`` states over ``layers`` layers as evenly as possible (the first layers get the remainder)."""
    return [budget // layers + (1 if i < budget % layers else 0) for i in range(layers)]


def hnn_truncation(args, target: list[int]) -> dict:
    """HNNTrainer's final cut: at CompreSSM's total size under ``--budget``, else at ``--hnn-tau``/``--target-tau``."""
    if args.budget is not None:
        return {"truncate_budget": sum(target)}
    return {"truncate_tau": args.hnn_tau if args.hnn_tau is not None else args.target_tau}


# ------------------------------------------------------------------------------------------ one seed


def run_seed(args, data, seed: int, num_labels: int) -> list[dict]:
    from transformers import set_seed

    from compressm_hf.trainer.baselines import (
        DistillationTrainer,
        GradientPruningCallback,
        HNNTrainer,
        LoraDistillationTrainer,
        RewindTrainer,
        WeightSnapshotCallback,
        make_lora_student,
        prune_states_,
        rewind_weights_,
        scratch_model,
        student_from_teacher,
    )
    from compressm_hf.trainer.callback import CompreSSMCallback

    methods = set(args.methods)
    cls = model_class(args)
    T = args.max_steps
    R = max(1, round(args.retrain_fraction * T))
    k_rewind = T - R
    rows: list[dict] = []

    def fresh(sizes=None):
        set_seed(seed)
        config = base_config(args, num_labels)
        return cls(config) if sizes is None else scratch_model(cls, config, sizes)

    def record(method, result, model, extra_s=0.0, **extra):
        row = {
            "method": method,
            "seed": seed,
            "quality": result["quality"],
            "eval_loss": result["eval_loss"],
            "state_sizes": state_sizes(model),
            "mean_state_size": float(np.mean(state_sizes(model))),
            "params": count_params(model),
            "train_s": result["train_s"],
            "total_s": result["train_s"] + extra_s,
            **extra,
        }
        rows.append(row)
        print(
            f"  [{method:>16s} seed {seed}] quality {row['quality']:.4f}  sizes {row['state_sizes']}  "
            f"train {row['train_s']:.1f}s  total {row['total_s']:.1f}s",
            flush=True,
        )
        return row

    full_model, teacher, full_s, snapshot = None, None, 0.0, None
    if methods & ({"full"} | NEEDS_FULL):
        model = fresh()
        snap_cb = WeightSnapshotCallback(step=k_rewind)
        res, _ = train(args, data, model, seed, callbacks=[snap_cb])
        full_model, full_s, snapshot = model, res["train_s"], snap_cb.snapshot
        teacher = copy.deepcopy(full_model)  # the distillation trainers freeze their teacher in place
        record("full", res, model)

    target = None
    for i, tau in enumerate(args.taus if "compressm" in methods else []):
        model = fresh()
        cb = CompreSSMCallback(tau=tau, seed=seed)
        res, _ = train(args, data, model, seed, callbacks=[cb])
        record(f"compressm(tau={tau:g})", res, model, tau=tau)
        if tau == args.target_tau or (target is None and i == len(args.taus) - 1):
            target = state_sizes(model)
    if args.budget is not None and "compressm" in methods:
        model = fresh()
        cb = CompreSSMCallback(target_total_state=args.budget, seed=seed)
        res, _ = train(args, data, model, seed, callbacks=[cb])
        taus = [e["budget"]["tau"] for e in cb.history if e.get("budget")]
        record(f"compressm(budget={args.budget})", res, model, budget=args.budget, budget_taus=taus)
        target = state_sizes(model)  # the baselines are built at exactly CompreSSM's sizes
    elif args.budget is not None:
        target = split_budget(args.budget, args.layers)
    if target is None:
        target = [max(1, round(args.target_fraction * args.state_size))] * args.layers
    print(f"  target sizes for the baselines: {target} (total {sum(target)})", flush=True)

    if "scratch_small" in methods:
        model = fresh(target)
        res, _ = train(args, data, model, seed)
        record("scratch_small", res, model)

    if "kd" in methods:
        model = fresh(target)
        res, _ = train(
            args,
            data,
            model,
            seed,
            trainer_cls=DistillationTrainer,
            teacher=teacher,
            alpha=args.kd_alpha,
            temperature=args.kd_temperature,
        )
        record("kd", res, model, extra_s=full_s)

    if "hnn" in methods:
        model = fresh()
        res, tr = train(
            args,
            data,
            model,
            seed,
            trainer_cls=HNNTrainer,
            hnn_lambda=args.hnn_lambda,
            **hnn_truncation(args, target),
        )
        record("hnn", res, model, hnn_lambda=args.hnn_lambda)

    if "grad_prune" in methods:
        model = fresh()
        every = max(1, round(args.prune_window * T / 4))
        cb = GradientPruningCallback(target=target, every=every, window=(0.0, args.prune_window))
        res, _ = train(args, data, model, seed, callbacks=[cb])
        record("grad_prune", res, model)

    for method in ("rewind_lr", "rewind_weights"):
        if method not in methods:
            continue
        model = copy.deepcopy(full_model)
        keeps = prune_states_(model, target, criterion=args.rewind_criterion)
        if method == "rewind_weights":
            rewind_weights_(model, snapshot, keeps)
        res, _ = train(
            args,
            data,
            model,
            seed,
            max_steps=R,
            trainer_cls=RewindTrainer,
            rewind_to_step=k_rewind,
            schedule_total_steps=T,
        )
        record(method, res, model, extra_s=full_s, retrain_steps=R)

    if "lora_kd" in methods:
        set_seed(seed)
        student = make_lora_student(student_from_teacher(full_model, target), r=args.lora_r)
        res, _ = train(
            args,
            data,
            student,
            seed,
            trainer_cls=LoraDistillationTrainer,
            teacher=teacher,
            alpha=args.kd_alpha,
            temperature=args.kd_temperature,
            align_weight=args.align_weight,
        )
        record("lora_kd", res, student, extra_s=full_s)
    return rows


# ----------------------------------------------------------------------------------------- reporting


def top3_mean(values: list[float], lower_is_better: bool = False) -> float | None:
    """The paper's statistic: the mean of the best 3 seeds (None with fewer than 3)."""
    if len(values) < 3:
        return None
    return statistics.fmean(sorted(values, reverse=not lower_is_better)[:3])


def summarize(rows: list[dict], lm: bool = False) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    full_s = [r["total_s"] for r in by.get("full", [])]
    out = []
    for method, rs in by.items():
        q = [r["quality"] for r in rs]
        t = [r["total_s"] for r in rs]
        out.append(
            {
                "method": method,
                "n_seeds": len(rs),
                "quality_mean": statistics.fmean(q),
                "quality_std": statistics.stdev(q) if len(q) > 1 else 0.0,
                "quality_top3_mean": top3_mean(q, lower_is_better=lm),
                "mean_state_size": statistics.fmean(r["mean_state_size"] for r in rs),
                "state_sizes": [r["state_sizes"] for r in rs],
                "total_s_mean": statistics.fmean(t),
                "speed_vs_full": (statistics.fmean(full_s) / statistics.fmean(t)) if full_s else None,
            }
        )
    return out


def markdown_table(args, summary: list[dict], command: str) -> str:
    metric = "val perplexity (lower better)" if is_lm(args) else "test accuracy"
    lines = [
        f"# CompreSSM vs baselines: {args.task}",
        "",
        f"`{command}`",
        "",
        f"{args.max_steps} optimizer steps per model, seeds {args.seeds}, n0={args.state_size}, "
        f"hidden={args.hidden_size}, layers={args.layers}, batch {args.batch_size}, lr {args.lr} cosine"
        + (f", model preset LRUConfig.{args.preset}" if args.preset else "")
        + (
            f", state budget {args.budget} (every method at CompreSSM's sizes)"
            if args.budget is not None
            else ""
        )
        + ". "
        f"Wall-clock includes the teacher / full run for kd, lora_kd and rewinding. torch threads: "
        f"{torch.get_num_threads()}, shared CPU machine (timings are noisy).",
        "",
        f"| method | {metric} (mean +- std) | top-3 mean | final mean state size | per-layer sizes (first seed) | "
        "total wall-clock (s) | speed vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        speed = f"{s['speed_vs_full']:.2f}x" if s["speed_vs_full"] is not None else "-"
        top3 = f"{s['quality_top3_mean']:.4f}" if s["quality_top3_mean"] is not None else "-"
        lines.append(
            f"| {s['method']} | {s['quality_mean']:.4f} +- {s['quality_std']:.4f} | {top3} | "
            f"{s['mean_state_size']:.1f} | {s['state_sizes'][0]} | {s['total_s_mean']:.1f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def plot(args, summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    tmax = max(s["total_s_mean"] for s in summary)
    offsets = [(6, 6), (6, -16), (-70, 8), (-70, -16)]  # staggered labels: runs often share a size
    for i, s in enumerate(summary):
        size = 60 + 900 * s["total_s_mean"] / tmax
        ax.errorbar(
            s["mean_state_size"],
            s["quality_mean"],
            yerr=s["quality_std"],
            fmt="none",
            ecolor="gray",
            alpha=0.6,
        )
        ax.scatter(s["mean_state_size"], s["quality_mean"], s=size, alpha=0.55, edgecolors="k")
        ax.annotate(
            f"{s['method']}\n{s['total_s_mean']:.0f}s",
            (s["mean_state_size"], s["quality_mean"]),
            textcoords="offset points",
            xytext=offsets[i % len(offsets)],
            fontsize=8,
        )
    ax.set_xlabel("final mean state size per layer")
    ax.set_ylabel("validation perplexity (lower is better)" if is_lm(args) else "test accuracy")
    ax.set_title(f"{args.task}: quality vs size (marker area ~ total wall-clock incl. teachers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--task", default="fmnist4", choices=["fmnist4", "fmnist2", "fmnist7", "mnist1d", "shakespeare"]
    )
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1)")
    seeds.add_argument("--num-seeds", type=int, default=None, help="run seeds 0 .. K-1")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument(
        "--taus",
        type=float,
        nargs="+",
        default=None,
        help="CompreSSM tau grid (default 0.05 0.1; none with --budget)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="global state budget (states summed over layers): CompreSSM(target_total_state=N) and every baseline "
        "at its sizes",
    )
    p.add_argument(
        "--preset", default=None, help="LRUConfig preset classmethod, e.g. paper_sequence_classification"
    )
    p.add_argument(
        "--target-tau", type=float, default=None, help="tau whose final sizes the baselines target"
    )
    p.add_argument(
        "--target-fraction", type=float, default=0.5, help="target size / n0 when compressm is not run"
    )
    p.add_argument("--state-size", type=int, default=None, help="default 64 (or the preset's)")
    p.add_argument("--hidden-size", type=int, default=None, help="default 32 (or the preset's)")
    p.add_argument("--layers", type=int, default=None, help="default 2 (or the preset's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--r-min", type=float, default=None, help="default 0.5 (or the preset's)")
    p.add_argument("--r-max", type=float, default=None, help="default 0.99 (or the preset's)")
    p.add_argument("--max-phase", type=float, default=None, help="default pi/10 (or the preset's)")
    p.add_argument("--max-train", type=int, default=20_000, help="train examples (LM: blocks)")
    p.add_argument("--max-test", type=int, default=2_000, help="eval examples (LM: blocks)")
    p.add_argument("--block-size", type=int, default=128, help="LM block length (bytes)")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--hnn-lambda", type=float, default=1e-3)
    p.add_argument(
        "--hnn-tau", type=float, default=None, help="HNN's final truncation tau (default: target tau)"
    )
    p.add_argument("--prune-window", type=float, default=0.1, help="grad_prune: events in the first fraction")
    p.add_argument("--retrain-fraction", type=float, default=0.5, help="rewinding: retrain R = fraction * T")
    p.add_argument("--rewind-criterion", default="hsv", choices=["hsv", "magnitude"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="benchmark_results")
    p.add_argument("--quick", action="store_true", help="~2 min smoke run (tiny model, data and budget)")
    args = p.parse_args(argv)
    resolve_model_and_budget(p, args)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.max_steps = min(args.max_steps, 20)
        args.state_size, args.hidden_size = min(args.state_size, 16), min(args.hidden_size, 8)
        args.max_train, args.max_test = min(args.max_train, 640), min(args.max_test, 200)
        args.batch_size = min(args.batch_size, 16)
        args.taus = args.taus[:1]
        args.block_size = min(args.block_size, 64)
    if args.target_tau is None and args.taus:
        args.target_tau = args.taus[-1]
    check_budget(p, args)
    return args


def resolve_model_and_budget(parser, args) -> None:
    """Fill the model flags (defaults or the preset's), the seeds and the taus; usage errors via ``parser.error``."""
    args.model_overrides = [k for k in MODEL_DEFAULTS if getattr(args, k) is not None]
    if args.preset is not None:
        presets = available_presets()
        if args.preset not in presets:
            parser.error(
                f"--preset {args.preset!r}: LRUConfig has no preset of that name; available: "
                f"{', '.join(presets) or 'none'}"
            )
        config = preset_config(args, num_labels=2)
        if is_lm(args) and getattr(config, "input_size", None) is not None:
            parser.error(
                f"--preset {args.preset} builds a model of continuous inputs (input_size={config.input_size}); "
                f"--task {args.task} is a byte-level language model"
            )
        for flag in MODEL_DEFAULTS:
            setattr(args, flag, getattr(config, CONFIG_FIELDS.get(flag, flag)))
    else:
        for flag, value in MODEL_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
    if args.num_seeds is not None:
        if args.num_seeds < 1:
            parser.error(f"--num-seeds must be >= 1, got {args.num_seeds}")
        args.seeds = list(range(args.num_seeds))
    elif args.seeds is None:
        args.seeds = [0, 1]
    if args.taus is None:
        args.taus = [] if args.budget is not None else [0.05, 0.1]


def check_budget(parser, args) -> None:
    """``--budget`` must leave a state per layer and be below the full model's total (usage error otherwise)."""
    if args.budget is not None:
        full = args.state_size * args.layers
        if not args.layers <= args.budget < full:
            parser.error(
                f"--budget {args.budget}: must be at least one state per layer ({args.layers}) and below the full "
                f"model's total state size ({args.layers} layers x {args.state_size} = {full})"
            )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    train_ds, eval_ds = load_task(args)
    num_labels = 256 if is_lm(args) else max(int(y) for y in train_ds.with_format(None)["labels"]) + 1
    print(
        f"task {args.task}: {len(train_ds)} train / {len(eval_ds)} eval, methods {args.methods}, seeds {args.seeds}",
        flush=True,
    )
    t_start = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"benchmark_{args.task}"
    rows = []
    for seed in args.seeds:
        rows.extend(run_seed(args, (train_ds, eval_ds), seed, num_labels))
        # written after every seed, so an interrupted run still leaves a table
        summary = summarize(rows, lm=is_lm(args))
        md = markdown_table(args, summary, command)
        stem.with_suffix(".md").write_text(md)
        payload = {
            "command": command,
            "args": vars(args),
            "seeds_done": sorted({r["seed"] for r in rows}),
            "summary": summary,
            "runs": rows,
            "wall_s": time.perf_counter() - t_start,
        }
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
        plot(args, summary, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.md / .json / .png in {payload['wall_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
