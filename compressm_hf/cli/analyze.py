"""``compressm-analyze``: Hankel spectra of a saved SSM model, and one post-hoc CompreSSM cut.

Subcommands::

    compressm-analyze spectrum MODEL_DIR [--taus 0.01 0.05 0.1] [--plot spectra.png] [--json spectra.json]
    compressm-analyze compress MODEL_DIR --tau 0.05 --output_dir OUT [--gate 0.95 --min_state_size 1 ...]

``MODEL_DIR`` is any saved model folder: an LRU, CompreSSM Mamba or CompreSSM Mamba-2 folder
(``compressm-train`` output, ``save_pretrained``), or a stock transformers ``mamba`` / ``mamba2`` checkpoint
folder (it loads into ``CompreSSMMambaForCausalLM`` / ``CompreSSMMamba2ForCausalLM`` unchanged; ``compress``
saves it as ``compressm_mamba`` / ``compressm_mamba2``). LRU layers are exact LTI systems: their Hankel
singular values are exact. Mamba and Mamba-2 layers are selective; their spectrum is that of the averaged
LTI surrogate (Mamba: per-state importance; Mamba-2: per-head Hankel singular values summed over the
heads, :func:`compressm_hf.grouped.grouped_rank_scores`) built from
statistics of a few calibration batches of the data the model was trained on: ``--dataset``, or by default
the training data ``compressm-train`` recorded in the folder (``compressm_train_args.json``); a folder
without that record (a stock checkpoint, a model trained by your own script) needs ``--dataset``. The text
is tokenized with the folder's tokenizer when it has one, else read as bytes.

The rank-policy defaults are the callback's (:mod:`compressm_hf.trainer.defaults`).

``compress`` applies one cut after training (the baseline that in-training compression is compared
against) and saves a loadable folder (weights, config with the new ``state_sizes``, model code +
``auto_map``) with ``compression_report.json``, plots and a model card; it prints the validation
perplexity before and after the cut.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from compressm_hf.cli import (
    ARCHITECTURE_TABLE,
    calibration_blocks,
    collect_statistics,
    format_table,
    load_causal_lm,
    needs_statistics,
    perplexity,
)
from compressm_hf.cli.helptext import HelpFormatter, as_flags, examples_epilog, plain_help
from compressm_hf.cli.train_record import RECORD_NAME, calibration_source
from compressm_hf.settings import CompreSSMConfig

__all__ = ["build_parser", "layer_spectra", "main", "rank_for_tau", "settings_from_args"]

DEFAULT_TAUS = (0.01, 0.05, 0.1)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _tau(value: str) -> float:
    try:
        tau = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number in [0, 1), got {value!r}") from None
    if not (math.isfinite(tau) and 0.0 <= tau < 1.0):
        raise argparse.ArgumentTypeError(
            f"tau must be in [0, 1) (the discarded fraction of the Hankel singular value sum), got {value}"
        )
    return tau


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return n

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return x


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data (Mamba / Mamba-2 statistics, perplexity)")
    g.add_argument(
        "--dataset",
        default=None,
        help="'shakespeare', a text/JSON file or folder, or a datasets name; default: the training data "
        f"recorded in MODEL_DIR/{RECORD_NAME} (needed when there is no record)",
    )
    g.add_argument(
        "--text_column",
        default=None,
        help="text column of JSON files / datasets; default: the recorded one, else 'text'",
    )
    g.add_argument("--block_size", type=_positive_int, default=128, help="tokens per calibration block")
    g.add_argument(
        "--calibration_batches",
        type=_positive_int,
        default=8,
        help="batches run to collect Mamba / Mamba-2 statistics",
    )
    g.add_argument("--batch_size", type=_positive_int, default=8, help="blocks per batch")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


SPECTRUM_EXAMPLES = [
    (
        "compressm-analyze spectrum outputs/shakespeare-mamba --taus 0.01 0.05 0.1 --plot spectrum.png",
        "per-layer spectra of a compressm-train folder, calibrated on its recorded training data",
    ),
    (
        "compressm-analyze spectrum path/to/stock-mamba --dataset corpus.txt --json spectra.json",
        "a stock transformers mamba (or mamba2) checkpoint: no record in the folder, so --dataset is needed",
    ),
]
COMPRESS_EXAMPLES = [
    (
        "compressm-analyze compress outputs/shakespeare-mamba --tau 0.05 --output_dir outputs/post-hoc",
        "one cut after training (the baseline in-training compression is compared against)",
    ),
    (
        "compressm-analyze compress path/to/stock-mamba2 --dataset shakespeare --tau 0.1 --output_dir out",
        "a stock transformers mamba2 checkpoint, cut and saved as compressm_mamba2",
    ),
]
MODEL_DIR_HELP = "saved model folder (LRU, CompreSSM Mamba / Mamba-2, or stock transformers mamba / mamba2)"


def build_parser() -> argparse.ArgumentParser:
    """The ``compressm-analyze`` parser: subcommands ``spectrum`` and ``compress``, each with the model folder,
    its own options, the rank policy and the calibration data, then examples; help without reST markup."""
    parser = argparse.ArgumentParser(
        prog="compressm-analyze",
        description="Hankel spectra of a saved SSM model (LRU, CompreSSM Mamba / Mamba-2 or a stock transformers\n"
        "mamba / mamba2 checkpoint), and one post-hoc CompreSSM cut. Run compressm-analyze {spectrum,compress} --help for\n"
        "the options of each.",
        epilog=examples_epilog([*SPECTRUM_EXAMPLES, *COMPRESS_EXAMPLES]),
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{spectrum,compress}")

    sp = sub.add_parser(
        "spectrum",
        help="per-layer Hankel spectra, the rank each tau would give, error bounds, a plot",
        description="Per-layer Hankel spectra, the rank each tau would give and its error bound, a plot.",
        epilog=examples_epilog(SPECTRUM_EXAMPLES),
        formatter_class=HelpFormatter,
    )
    sp.add_argument("model_dir", help=MODEL_DIR_HELP)
    sp.add_argument("--taus", type=_tau, nargs="+", default=list(DEFAULT_TAUS), help="tolerances to tabulate")
    sp.add_argument("--plot", default=None, help="write the spectra to this PNG")
    sp.add_argument("--json", default=None, help="write the spectra and ranks to this JSON file")
    _add_policy(sp, with_tau=False)
    _add_calibration(sp)

    cp = sub.add_parser(
        "compress",
        help="apply one CompreSSM cut to a trained model and save it",
        description="Apply one CompreSSM cut to a trained model and save it as a loadable folder.",
        epilog=examples_epilog(COMPRESS_EXAMPLES),
        formatter_class=HelpFormatter,
    )
    cp.add_argument("model_dir", help=MODEL_DIR_HELP)
    cp.add_argument("--output_dir", required=True, help="where to save the compressed model")
    _add_policy(cp, with_tau=True)
    cp.add_argument(
        "--eval_blocks",
        type=_non_negative_int,
        default=32,
        help="validation blocks for perplexity before/after the cut (0: skip)",
    )
    cp.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir")
    _add_calibration(cp)
    return plain_help(parser)


def _add_policy(p: argparse.ArgumentParser, *, with_tau: bool) -> None:
    """The rank-policy flags: :class:`~compressm_hf.CompreSSMConfig` fields, with its help and defaults."""
    g = p.add_argument_group("rank policy (as CompreSSMCallback)")
    if with_tau:
        _add_setting(
            g,
            "tau",
            type=_tau,
            help="Discarded fraction of each layer's Hankel-singular-value sum, in [0, 1); required with mode "
            "tolerance.",
        )
        _add_setting(g, "mode", choices=["tolerance", "fixed"])  # pragmatic needs a training run
        _add_setting(g, "fixed_fraction", type=float)
        _add_setting(g, "selection")
        _add_setting(g, "seed", type=int)
    _add_setting(g, "gate", type=_fraction)
    _add_setting(g, "min_state_size", type=_positive_int)
    _add_setting(g, "round_to", type=_positive_int)


def _add_setting(group, name: str, **kwargs) -> None:
    """``--name`` for the CompreSSMConfig field ``name``: its help, default and choices unless given."""
    setting = CompreSSMConfig.__dataclass_fields__[name]
    kwargs.setdefault("default", setting.default)
    kwargs.setdefault("help", setting.metadata["help"])
    if "choices" in setting.metadata:
        kwargs.setdefault("choices", list(setting.metadata["choices"]))
    group.add_argument(f"--{name}", **kwargs)


POLICY_SETTINGS = ("tau", "mode", "fixed_fraction", "selection", "seed", "gate", "min_state_size", "round_to")


def settings_from_args(args: argparse.Namespace) -> CompreSSMConfig:
    """The :class:`~compressm_hf.CompreSSMConfig` of the parsed rank-policy flags (those the subcommand has);
    ``config.policy()`` is the rank policy. Raises ``InvalidSettingError`` (a ValueError) for a bad value."""
    return CompreSSMConfig(**{name: getattr(args, name) for name in POLICY_SETTINGS if hasattr(args, name)})


# ---------------------------------------------------------------------------------------------- spectra

# reduction rule -> (y-axis label of a panel, what the plot title calls the scores)
SCORE_NAMES = {
    "balanced": ("Hankel singular value", "Hankel singular values"),
    "modal": ("state importance (surrogate)", "state importance (averaged LTI surrogate)"),
    "grouped": (
        "HSV (surrogate, sum over heads)",
        "Hankel singular values of the averaged LTI surrogate, summed over heads",
    ),
}


def layer_spectra(model) -> list[dict]:
    """Per reducible layer: ``{"layer", "n", "rule", "scores" (sorted desc, float64), "surrogate"}``.

    The scores are those the planner applies the rank rule to (:func:`compressm_hf.planning.rank_scores`), so
    the ranks shown are the ranks ``compress`` cuts to. ``"balanced"`` layers (LRU): Hankel singular values of
    the exact LTI system. ``"modal"`` layers (Mamba): per-state importance ``sqrt(P_ii Q_ii)`` of the
    surrogate, summed over channels. ``"grouped"`` layers (Mamba-2): every head's sorted Hankel singular
    values of its dense surrogate, summed over the heads. Statistics must have been collected for Mamba and
    Mamba-2 layers.
    """
    from compressm_hf import find_reducible_layers
    from compressm_hf.planning import rank_scores

    out = []
    for layer in find_reducible_layers(model):
        system = layer.lti_system()
        n = int(layer.state_size)
        scores = rank_scores(system)
        out.append(
            {
                "layer": int(layer.layer_idx),
                "n": n,
                "rule": system.reduction,
                "scores": scores.detach().double().cpu(),
                "surrogate": getattr(system, "surrogate", None),
            }
        )
    return out


def rank_for_tau(
    scores: torch.Tensor, tau: float, *, gate: float, min_state_size: int, round_to: int
) -> dict:
    """What the tolerance rule does with ``tau`` on sorted ``scores``: rule rank, final rank, energy, bound."""
    from compressm_hf import apply_gate, round_rank, select_rank

    policy = CompreSSMConfig(tau=tau, gate=gate, min_state_size=min_state_size, round_to=round_to).policy()
    n = scores.shape[-1]
    raw = int(select_rank(scores, tau))
    rank = round_rank(min(n, max(raw, policy.min_rank)), policy.multiple_of, n)
    cut = bool(apply_gate(rank, n, policy.gate))
    final = rank if cut else n
    total = float(scores.sum())
    kept = float(scores[:final].sum())
    return {
        "tau": tau,
        "rule_rank": raw,
        "rank": final,
        "cut": cut,
        "energy_kept": kept / total if total > 0 else 1.0,
        "error_bound": 2.0 * (total - kept),
    }


def plot_spectra(spectra: list[dict], taus: list[float], path: str | Path, title: str) -> str:
    """One log-scale panel per layer with the rank of each tau marked; written with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ncols = max(1, min(4, len(spectra)))
    nrows = max(1, math.ceil(len(spectra) / ncols))
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(spectra) :]:
        ax.axis("off")
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for ax, spec in zip(axes.flat, spectra):
        values = spec["scores"].tolist()
        positive = [v for v in values if v > 0 and math.isfinite(v)]
        floor = min(positive) * 1e-3 if positive else 1e-12
        values = [v if v > 0 and math.isfinite(v) else floor for v in values]
        xs = list(range(1, len(values) + 1))
        ax.plot(xs, values, color="#1f77b4", marker="o", markersize=2.5, linewidth=1.0)
        ax.set_yscale("log")
        for i, entry in enumerate(spec["ranks"]):
            color = colors[i % len(colors)]
            label = f"\u03c4={entry['tau']:g}: keep {entry['rank']}" + ("" if entry["cut"] else " (gate)")
            ax.axvline(entry["rank"] + 0.5, color=color, linestyle="--", linewidth=1.1, label=label)
        ax.set_xlim(0.5, len(values) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        what = SCORE_NAMES.get(spec["rule"], ("score", "scores"))[0]
        ax.set_title(f"layer {spec['layer']} (n = {spec['n']})", fontsize=10)
        ax.set_xlabel("state (sorted)", fontsize=9)
        ax.set_ylabel(what, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left", frameon=True, framealpha=0.8)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    if path.parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, format="png")
    return str(path)


def _prepare(args, model, model_dir, *, eval_blocks: int = 0):
    """Collect Mamba statistics if needed; returns ``(description, eval_blocks_tensor_or_None)``."""
    stats = needs_statistics(model)
    if not stats and eval_blocks == 0:
        return "exact LTI systems (no calibration data needed)", None
    dataset, text_column, split, how = calibration_source(model_dir, args.dataset, args.text_column)
    train, evals = calibration_blocks(
        dataset,
        block_size=args.block_size,
        num_train_blocks=args.calibration_batches * args.batch_size if stats else 1,
        num_eval_blocks=eval_blocks,
        text_column=text_column,
        split=split,
        model_dir=model_dir,
        vocab_size=getattr(model.config, "vocab_size", None),
    )
    if not stats:
        return "exact LTI systems (no calibration data needed)", evals
    tokens = collect_statistics(model, train, args.batch_size)
    shown = Path(dataset).name if Path(dataset).exists() else dataset  # a local file by name (reports)
    return (
        f"averaged LTI surrogate from {tokens:,} calibration tokens of {shown!r} ({how}; "
        f"{len(train)} blocks of {args.block_size})",
        evals,
    )


def _load(model_dir: str, device: str):
    model, kind = load_causal_lm(model_dir)
    model.to(device)
    model.eval()
    return model, kind


def cmd_spectrum(args) -> int:
    model, kind = _load(args.model_dir, args.device)
    t0 = time.perf_counter()
    source, _ = _prepare(args, model, args.model_dir)
    spectra = layer_spectra(model)
    for spec in spectra:
        spec["ranks"] = [
            rank_for_tau(
                spec["scores"],
                tau,
                gate=args.gate,
                min_state_size=args.min_state_size,
                round_to=args.round_to,
            )
            for tau in args.taus
        ]
    sizes = [s["n"] for s in spectra]
    arch = ARCHITECTURE_TABLE[kind]
    rules = {s["rule"] for s in spectra}
    print(f"{args.model_dir}: {kind}, {len(spectra)} layers, state sizes {sizes}")
    print(f"spectra: {source}")
    rows = []
    for spec in spectra:
        s = spec["scores"]
        for entry in spec["ranks"]:
            rows.append(
                [
                    str(spec["layer"]),
                    str(spec["n"]),
                    f"{entry['tau']:g}",
                    str(entry["rule_rank"]),
                    f"{entry['rank']}" + ("" if entry["cut"] else " (gate)"),
                    f"{entry['energy_kept']:.2%}",
                    f"{entry['error_bound']:.3g}",
                    f"{float(s[0]):.3g} .. {float(s[-1]):.3g}",
                ]
            )
    print(
        format_table(
            ["layer", "n", "tau", "rule rank", "new size", "energy kept", "error bound", "sigma max .. min"],
            rows,
        )
    )
    totals = []
    for i, tau in enumerate(args.taus):
        after = sum(spec["ranks"][i]["rank"] for spec in spectra)
        totals.append(f"tau={tau:g}: {sum(sizes)} -> {after}")
    print("total state size: " + "; ".join(totals))
    print(
        "error bound = 2 * sum of the discarded values"
        + (
            " (rigorous H-inf bound for the exact LTI layers)"
            if arch.exact
            else " (heuristic for the surrogate"
            + ("; not a bound for the kept subset of states)" if "grouped" in rules else ")")
        )
        + f"; gate {args.gate}, min_state_size {args.min_state_size}, round_to {args.round_to}"
    )
    if args.plot:
        title = f"{Path(args.model_dir).name}: {arch.label} " + " / ".join(
            SCORE_NAMES.get(rule, ("score", "scores"))[1] for rule in sorted(rules)
        )
        print(f"plot: {plot_spectra(spectra, args.taus, args.plot, title)}")
    if args.json:
        payload = {
            "model_dir": str(args.model_dir),
            "kind": kind,
            "source": source,
            "layers": [{**spec, "scores": spec["scores"].tolist()} for spec in spectra],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", "utf-8")
        print(f"json: {args.json}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_compress(args) -> int:
    from compressm_hf.engine import compress_model, record_compression
    from compressm_hf.trainer.model_card import write_model_card
    from compressm_hf.trainer.report import build_report, config_record, jsonable

    out = Path(args.output_dir)
    if out.resolve() == Path(args.model_dir).resolve():
        raise SystemExit(
            "compressm-analyze compress: --output_dir must differ from MODEL_DIR (the source is not modified)"
        )
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"compressm-analyze compress: {str(out)!r} is not empty; pass --overwrite to write into it"
        )
    model, kind = _load(args.model_dir, args.device)
    arch = ARCHITECTURE_TABLE[kind]
    source, evals = _prepare(args, model, args.model_dir, eval_blocks=args.eval_blocks)
    ppl_before = perplexity(model, evals, args.batch_size) if evals is not None else None

    policy = args.settings.policy()  # tau counts only in tolerance mode
    previous = getattr(model.config, "compression", None)
    cut = compress_model(model, policy, seed=args.seed)  # the engine of the callback (pole margin, skips)
    sizes_before, sizes_after = cut.sizes_before, cut.sizes_after
    step = 0
    event = {
        "kind": "reduction",
        "step": step,
        "epoch": None,
        "post_hoc": True,
        "sizes_before": sizes_before,
        "sizes_after": sizes_after,
        "layers_reduced": cut.layers_reduced,
        "wall_time_s": cut.wall_time_s,
        "layers": cut.layers,
    }
    events = [jsonable(event)]
    record_compression(
        model, config_record(tau=args.tau, mode=args.mode, original_sizes=sizes_before, events=events)
    )
    ppl_after = perplexity(model, evals, args.batch_size) if evals is not None else None

    report = build_report(
        config={
            "tau": args.tau,
            "mode": args.mode,
            "post_hoc": True,
            "source": Path(args.model_dir).name,  # the folder's name only: the report is uploaded with it
            "statistics": source,
            "gate": args.gate,
            "min_state_size": args.min_state_size,
            "round_to": args.round_to,
            "selection": args.selection,
            "fixed_fraction": args.fixed_fraction,
            "seed": args.seed,
            "previous_compression": previous,
        },
        schedule_steps=[step],
        original_sizes=sizes_before,
        final_sizes=sizes_after,
        events=events,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in (*TOKENIZER_FILES, RECORD_NAME):  # the record: what the source was trained on
        src = Path(args.model_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    metrics = {}
    if ppl_before is not None:
        metrics = {"perplexity before the cut": ppl_before, "perplexity after the cut": ppl_after}
    total_b, total_a = sum(sizes_before), sum(sizes_after)
    write_model_card(
        out,
        report=report,
        metrics=metrics or None,
        model_name=out.name,
        model_summary=(
            f"{arch.article.capitalize()} {arch.label} model compressed after training with CompreSSM "
            f"(`compressm-analyze compress`, one cut): total state size {total_b} -> {total_a}."
        ),
        training_summary=f"Compressed post hoc from `{args.model_dir}`; statistics: {source}.",
    )

    rows = []
    for r in cut.layers:
        rows.append(
            [
                str(r["layer_idx"]),
                str(r["n_before"]),
                str(r["n_after"]),
                f"{r['energy_kept']:.2%}" if r["reduced"] else "-",
                f"{r['error_bound']:.3g}" if r["reduced"] else "-",
                _note(r),
            ]
        )
    rows.append(["total", str(total_b), str(total_a), "", "", ""])
    tau_txt = f"tau={args.tau:g}" if args.mode == "tolerance" else f"fixed fraction {args.fixed_fraction:g}"
    print(f"{args.model_dir} ({kind}): one post-hoc cut, {tau_txt}; statistics: {source}")
    print(format_table(["layer", "before", "after", "energy kept", "error bound", "note"], rows))
    if ppl_before is not None:
        print(
            f"validation perplexity ({len(evals)} blocks of {args.block_size}): {ppl_before:.3f} -> {ppl_after:.3f}"
        )
    print(f"saved to {out}/ (config.json, model.safetensors, compression_report.json, plots, README.md)")
    return 0


def _note(record: dict) -> str:
    """The note column of one layer's row: why it was not cut, or (a kept subset of states, Mamba-2) the
    energy the HSV rule promised next to the energy the subset holds."""
    if not record["reduced"]:
        return record.get("reason", "")
    promised = (record.get("extra") or {}).get("energy_promised")
    return "" if promised is None else f"subset; HSV rule promised {promised:.2%}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``compressm-analyze``."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "compress" and args.mode == "tolerance" and args.tau is None:
        parser.error("compress --mode tolerance needs --tau (e.g. --tau 0.05)")
    try:
        args.settings = settings_from_args(args)  # the settings' own checks (fixed_fraction in (0, 1), ...)
    except ValueError as err:
        parser.error(as_flags(err))
    try:
        model_ok = Path(args.model_dir).is_dir()
        if not model_ok:
            parser.error(f"MODEL_DIR {args.model_dir!r} is not a folder")
        return cmd_spectrum(args) if args.command == "spectrum" else cmd_compress(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"compressm-analyze {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
