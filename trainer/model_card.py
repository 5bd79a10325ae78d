"""Model cards (README.md) for models compressed with CompreSSM.

``write_model_card(save_directory, report=...)`` writes into a saved model folder everything a reader of the
Hub page needs: ``compression_report.json``, the two plots (when matplotlib is installed) and a ``README.md``
built with ``huggingface_hub.ModelCard.from_template`` from ``model_cards/compressm_model_card.md``. The YAML
metadata carries ``library_name``, tags, ``pipeline_tag``, datasets, ``base_model``, the license and a
``compressm`` block with the state sizes, so the Hub can filter on it and scripts can read it back with
``ModelCard.load``.

The "How to use" section is a runnable ``pipeline`` / ``generate`` snippet when the folder holds the byte-level
tokenizer (``tokenizer_config.json`` of ``CompreSSMByteTokenizer``); ``write_model_card`` saves that tokenizer
into the folder of a CompreSSM causal LM with a 256-byte vocabulary that has none. The error column says what
the number is for the reduction rule used: an H-infinity bound for balanced truncation of an LTI layer (LRU), a
heuristic estimate for the averaged surrogate of a selective layer (Mamba).

The card is meant to be pushed, so it names no local path: the folder's absolute path in the summaries is
written relative to the folder (``<folder>/checkpoint-10`` -> ``checkpoint-10``, ``<folder>`` -> ``./``; see
:func:`relative_to_folder`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .plots import (
    HSV_PLOT_NAME,
    STATE_SIZES_PLOT_NAME,
    normalize_report,
    plot_hsv_spectra,
    plot_state_sizes,
)

__all__ = [
    "CITATION",
    "REPORT_NAME",
    "build_model_card",
    "load_report",
    "relative_to_folder",
    "save_byte_tokenizer",
    "write_model_card",
]

logger = logging.getLogger(__name__)

REPORT_NAME = "compression_report.json"
TEMPLATE_NAME = "compressm_model_card.md"

CITATION = """@inproceedings{chahine2026compressm,
  title         = {The Curious Case of In-Training Compression of State Space Models},
  author        = {Chahine, Makram and Nazari, Philipp and Rus, Daniela and Rusch, T. Konstantin},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2510.02823},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2510.02823}
}"""

# config.json model_type -> tag
_MODEL_TYPES = {"compressm_lru": "lru", "compressm_mamba": "mamba", "compressm_mamba2": "mamba2"}
# classes exported by compressm_hf (lazily), usable in the "with compressm-hf installed" snippet
_PACKAGE_CLASSES = {
    "LRUForCausalLM",
    "LRUForSequenceClassification",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMamba2ForCausalLM",
}
# causal LMs of ours that compressm-train trains on raw bytes (they get the byte-level tokenizer)
_BYTE_LM_CLASSES = {"LRUForCausalLM", "CompreSSMMambaForCausalLM", "CompreSSMMamba2ForCausalLM"}
BYTE_TOKENIZER_CLASS = "CompreSSMByteTokenizer"
# what the report's ``error_bound`` is, per reduction rule: (column name, sentence for the card)
_ERROR_MEANING = {
    "balanced": (
        "error bound",
        "for balanced truncation (rule `balanced`, the LRU's linear time-invariant layer) the *error bound* is "
        "the exact balanced-truncation bound on the H∞ norm of the layer's error, twice the sum of the "
        "discarded HSVs",
    ),
    "modal": (
        "error estimate",
        "for the selective Mamba layer (rule `modal`) the *error estimate* is twice the sum of the discarded "
        "states' Hankel importances: an error estimate (heuristic, from the averaged LTI surrogate), not a "
        "bound, since the layer's input-dependent dynamics are not the surrogate and a kept subset of states "
        "is not a balanced truncation",
    ),
    # Mamba-2 plans keep a subset of state channels per group (their plans say rule "modal"; the tag decides)
    "grouped": (
        "error estimate",
        "for the selective Mamba-2 layer the *error estimate* is twice the sum of the discarded Hankel singular "
        "values of the per-head averaged LTI surrogate: the balanced-truncation bound of the cut the HSV rule "
        "promised, not a bound for the kept subset of state channels (the report gives both the energy "
        "promised and the energy the kept subset holds, `extra.energy_promised` / `energy_kept`)",
    ),
}


def _template_path() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("compressm_hf.model_cards") / TEMPLATE_NAME))
    except (ImportError, ModuleNotFoundError, TypeError):  # running from a source tree without the package
        return Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``compression_report.json`` (a file, or a folder that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not isinstance(report, dict):
        raise ValueError(
            f"{path} does not hold a compression report (a JSON object); got {type(report).__name__}"
        )
    return report


def relative_to_folder(text: str | None, folder: str | os.PathLike) -> str | None:
    """``text`` with the absolute path of ``folder`` written relative to the folder (for files kept in it).

    ``<folder>/checkpoint-10`` becomes ``checkpoint-10`` and ``<folder>`` (or ``<folder>/``) alone becomes
    ``./``; a longer path that merely starts with the same characters (``<folder>2``) is left alone.
    """
    if not text:
        return text
    folder = Path(folder)
    for base in sorted({str(folder.absolute()), str(folder.resolve())}, key=len, reverse=True):
        if len(base) <= 1:  # "/" would match every path
            continue
        text = re.sub(re.escape(base) + r"/(?=[^\s/])", "", text)
        text = re.sub(re.escape(base) + r"(?![\w-]|\.\w)/?", "./", text)
    return text


def _read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """``folder/name`` as a dict (``{}`` when it is missing or not a JSON object)."""
    try:
        with open(folder / name, encoding="utf-8") as f:
            config = json.load(f)
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


def _error_meaning(report: Mapping[str, Any] | None, model_type_tag: str | None) -> dict[str, str]:
    """The error column's name and the sentence saying what it is, for the rules used in ``report``.

    Reports that name no known rule fall back on the architecture (LRU: balanced, Mamba: modal).
    """
    rules = (
        ["grouped"]
        if model_type_tag == "mamba2"
        else sorted(
            {
                layer.get("rule")
                for event in normalize_report(report or {}).get("events", [])
                for layer in event.get("layers", [])
                if layer.get("rule") in _ERROR_MEANING
            }
        )
        or [rule for tag, rule in (("lru", "balanced"), ("mamba", "modal")) if tag == model_type_tag]
    )
    if not rules:
        return {
            "error_column": "error bound",
            "error_note": "The *error bound* is twice the sum of the discarded HSVs (an H∞ bound for balanced "
            "truncation of a linear time-invariant layer; a heuristic estimate for a selective one).",
        }
    names = sorted({_ERROR_MEANING[rule][0] for rule in rules})
    sentences = "; ".join(_ERROR_MEANING[rule][1] for rule in rules)
    return {"error_column": " / ".join(names), "error_note": sentences[0].upper() + sentences[1:] + "."}


def _is_byte_lm(config: Mapping[str, Any]) -> bool:
    """A causal LM of ours with one id per byte (what ``compressm-train`` trains)."""
    architectures = config.get("architectures") or []
    return bool(architectures) and architectures[0] in _BYTE_LM_CLASSES and config.get("vocab_size") == 256


def save_byte_tokenizer(folder: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Save ``CompreSSMByteTokenizer`` (with ``config``'s special byte ids) into ``folder``.

    Args:
        folder: a saved model folder.
        config: its ``config.json`` as a dict (``vocab_size`` >= 256, ``bos/eos/pad_token_id`` bytes or None).
    """
    from types import SimpleNamespace

    from compressm_hf.modeling.tokenization_bytes import CompreSSMByteTokenizer

    CompreSSMByteTokenizer.for_model_config(SimpleNamespace(**config)).save_pretrained(folder)


def _format_fraction(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if 0.0 < 1.0 - value < 5e-4:  # "100.00%" would hide that states were discarded
        return f"1 − {1.0 - value:.1e}"
    return f"{value:.2%}"


def _format_number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _compression_context(report: Mapping[str, Any], model_type_tag: str | None = None) -> dict[str, Any]:
    norm = normalize_report(report)
    original, final = norm["original_state_sizes"], norm["final_state_sizes"]
    rows = []
    for event in norm["events"]:
        for entry in event["layers"]:
            bound = entry.get("error_bound")
            rows.append(
                {
                    "step": event["step"],
                    "layer": entry["layer"],
                    "n_before": entry["n_before"],
                    "n_after": entry["n_after"],
                    "energy_kept": _format_fraction(entry.get("energy_kept"))
                    if entry["reduced"]
                    else "no cut" + (f" ({entry['reason']})" if entry.get("reason") else ""),
                    "error_bound": f"{float(bound):.3g}" if bound is not None and entry["reduced"] else "–",
                    "rule": entry.get("rule") or "–",
                    "selection": entry.get("selection") or "–",
                }
            )
    rollbacks = [
        {
            "step": e["step"],
            "restored_step": e.get("restored_step", "?"),
            "metric": e.get("metric", "the metric"),
            "before": _format_number(e.get("metric_before")),
            "after": _format_number(e.get("metric_after")),
        }
        for e in norm["rollbacks"]
    ]
    layer_summary = [
        {"layer": i, "original": n0, "final": n1, "ratio": f"{n1 / n0:.0%}" if n0 else "–"}
        for i, (n0, n1) in enumerate(zip(original, final))
    ]
    total_before, total_after = sum(original), sum(final)
    steps = sorted({e["step"] for e in norm["events"]})
    return {
        "tau": _format_number(norm["tau"]),
        "mode": norm["mode"] or "–",
        "num_events": len(norm["events"]),
        "steps": ", ".join(str(s) for s in steps),
        "rows": rows,
        "rollbacks": rollbacks,
        "layer_summary": layer_summary,
        "total_before": total_before,
        "total_after": total_after,
        "total_ratio": f"{total_after / total_before:.0%}" if total_before else "–",
        "tau_value": norm["tau"],
        "mode_value": norm["mode"],
        "original_state_sizes": original,
        "final_state_sizes": final,
        **_error_meaning(report, model_type_tag),
    }


def _metric_rows(metrics: Mapping[str, Any] | None) -> list[dict[str, str]]:
    if not metrics:
        return []
    return [{"name": str(k), "value": _format_number(v)} for k, v in metrics.items()]


def build_model_card(
    *,
    report: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_names: str | Iterable[str] | None = None,
    base_model: str | None = None,
    model_type_tag: str | None = None,
    license: str | None = "apache-2.0",
    pipeline_tag: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    model_summary: str | None = None,
    language: str | list[str] | None = None,
    tags: Iterable[str] | None = None,
    config: Mapping[str, Any] | None = None,
    plots: Iterable[tuple[str, str]] = (),
    training_summary: str | None = None,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Build the card in memory; ``write_model_card`` is the usual entry point.

    ``config`` is the model's ``config.json`` as a dict (used to pick the tag, auto class and pipeline tag);
    ``tokenizer_config`` its ``tokenizer_config.json`` (the byte-level tokenizer makes "How to use" a
    ``pipeline`` / ``generate`` snippet on raw UTF-8 bytes); ``plots`` is a sequence of ``(file name, alt
    text)`` pairs relative to the card.
    """
    config = dict(config or {})
    model_type = config.get("model_type")
    known = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if model_type_tag is None and known is not None:
        model_type_tag = known
    architecture_name = {"lru": "LRU", "mamba": "Mamba", "mamba2": "Mamba-2"}.get(
        model_type_tag or "", "state space"
    )

    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    auto_map = config.get("auto_map") or {}
    auto_class = next((k for k in auto_map if k.startswith("AutoModelFor")), None)
    if auto_class is None:
        classification = bool(architecture and architecture.endswith("ForSequenceClassification"))
        classification = classification or pipeline_tag == "text-classification"
        auto_class = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    if pipeline_tag is None:
        pipeline_tag = (
            "text-classification" if auto_class == "AutoModelForSequenceClassification" else "text-generation"
        )
    package_class = architecture if architecture in _PACKAGE_CLASSES else None
    # Without a config we cannot tell; saved CompreSSM models normally carry their code (auto_map).
    remote_code = bool(auto_map) or not config
    tokenizer_config = dict(tokenizer_config or {})
    byte_tokenizer = (
        tokenizer_config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS
        and auto_class == "AutoModelForCausalLM"
    )
    if byte_tokenizer:  # the snippet loads the tokenizer too: remote only if both carry their code
        remote_code = bool(auto_map) and "AutoTokenizer" in (tokenizer_config.get("auto_map") or {})

    compression = _compression_context(report, model_type_tag) if report else None
    card_tags = ["compressm", "state-space-model"]
    if model_type_tag:
        card_tags.append(model_type_tag)
    if compression and compression["total_after"] < compression["total_before"]:
        card_tags.append("compressed")
    for tag in tags or []:
        if tag not in card_tags:
            card_tags.append(tag)

    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    datasets = list(dataset_names) if dataset_names else None

    extra: dict[str, Any] = {}
    if compression:
        extra["compressm"] = {
            "tau": compression["tau_value"],
            "mode": compression["mode_value"],
            "original_state_sizes": compression["original_state_sizes"],
            "final_state_sizes": compression["final_state_sizes"],
            "events": compression["num_events"],
        }
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        language=language,
        pipeline_tag=pipeline_tag,
        tags=card_tags,
        datasets=datasets,
        base_model=base_model,
        **extra,
    )

    repo_id = repo_id or "<namespace>/<model-name>"
    model_name = model_name or repo_id.split("/")[-1]
    if model_summary is None:
        what = {"lru": "An LRU model", "mamba": "A Mamba model", "mamba2": "A Mamba-2 model"}.get(
            model_type_tag or "", "A state space model"
        )
        if compression and compression["total_before"]:
            model_summary = (
                f"{what} whose total state size was reduced from {compression['total_before']} to "
                f"{compression['total_after']} ({compression['total_ratio']}) during training."
            )
        else:
            model_summary = f"{what} trained with CompreSSM."
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        model_name=model_name,
        model_summary=model_summary,
        architecture_name=architecture_name,
        reduction_method=_reduction_method(report, model_type_tag),
        compression=compression,
        plots=[{"file": f, "alt": alt} for f, alt in plots],
        metrics=_metric_rows(metrics),
        datasets=datasets or [],
        base_model=base_model,
        auto_class=auto_class,
        package_class=package_class,
        remote_code=remote_code,
        byte_tokenizer=byte_tokenizer,
        repo_id=repo_id,
        training_summary=training_summary,
        citation=CITATION,
    )


def _reduction_method(report, model_type_tag: str | None = None) -> str:
    """One sentence on how the layers were reduced, from the rules recorded in the report."""
    if model_type_tag == "mamba2":
        return (
            "each layer's input-dependent dynamics are averaged over training tokens into one LTI surrogate per "
            "head (a scalar decay over its group's states), the dense Gramians of every head give its Hankel "
            "singular values, the rank comes from the (1 - tau) rule on their sum, and each group keeps the state "
            "channels of largest Hankel importance summed over its heads (a subset of the original channels, so "
            "the stock Mamba-2 layout still applies)."
        )
    rules = {
        layer.get("rule")
        for event in (report or {}).get("events", [])
        for layer in event.get("layers", [])
        if layer.get("rule")
    }
    if rules == {"modal"}:
        return (
            "each layer's input-dependent dynamics are averaged over training batches into an LTI surrogate, "
            "every state is scored by its Hankel importance sqrt(P_ii Q_ii) summed over channels, and one "
            "shared set of the most important states is kept (modal truncation; the stock kernels still apply)."
        )
    return (
        "the layer's Hankel singular values (HSVs) are computed from its Gramians, the states holding "
        "(1 - tau) of their sum are kept by balanced truncation, and the reduced system is re-diagonalized."
    )


def write_model_card(
    save_directory: str | os.PathLike,
    *,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_names: str | Iterable[str] | None = None,
    base_model: str | None = None,
    model_type_tag: str | None = None,
    license: str | None = "apache-2.0",
    pipeline_tag: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    model_summary: str | None = None,
    language: str | list[str] | None = None,
    tags: Iterable[str] | None = None,
    training_summary: str | None = None,
    make_plots: bool = True,
    max_steps: int | None = None,
    config: Mapping[str, Any] | None = None,
    save_tokenizer: bool | None = None,
) -> ModelCard:
    """Write ``README.md`` (and the report and plots) into a saved model folder and return the card.

    Args:
        save_directory: the folder written by ``save_pretrained`` / ``Trainer.save_model``. Created if missing.
        report: the compression report (a dict, or a path to a JSON file or to a folder holding one). It is
            written to ``save_directory/compression_report.json``. If ``None``, an existing
            ``compression_report.json`` in the folder is used.
        metrics: training / evaluation results, e.g. ``{"eval_loss": 2.31, "perplexity": 10.1}``.
        dataset_names: Hub dataset ids for the ``datasets`` metadata.
        base_model: the Hub id this model was fine-tuned from, if any.
        model_type_tag: ``"lru"`` or ``"mamba"``; inferred from ``config.json`` when left out.
        license: the ``license`` metadata.
        pipeline_tag: defaults to ``text-generation`` (``text-classification`` for classifiers).
        repo_id: used in the loading snippet; a placeholder if unknown.
        training_summary: extra markdown for a "Training details" section.
        make_plots: draw ``hsv_spectra.png`` and ``state_sizes.png`` from the report (needs matplotlib; skipped
            with a warning without it). Plots already in the folder are embedded either way.
        max_steps: the length of training, for the x axis of the state-size plot.
        config: the model config as a dict; default: ``save_directory/config.json`` if there is one.
        save_tokenizer: save the byte-level tokenizer (``CompreSSMByteTokenizer``) into the folder. ``None``
            (default): only for a CompreSSM causal LM with ``vocab_size`` 256 whose folder has no
            ``tokenizer_config.json`` yet.
    """
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    if report is not None and not isinstance(report, Mapping):
        report = load_report(report)
    report_path = folder / REPORT_NAME
    if report is not None:
        tmp = report_path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, report_path)
    elif report_path.is_file():
        report = load_report(report_path)

    if report is not None and make_plots:
        try:
            plot_hsv_spectra(report, folder / HSV_PLOT_NAME)
            plot_state_sizes(report, folder / STATE_SIZES_PLOT_NAME, max_steps=max_steps)
        except ImportError as err:
            warnings.warn(f"No plots in the model card: {err}", stacklevel=2)
    plots = [
        (name, alt)
        for name, alt in (
            (HSV_PLOT_NAME, "Hankel singular value spectra at every compression event, with each cut"),
            (STATE_SIZES_PLOT_NAME, "State size of each layer during training"),
        )
        if (folder / name).is_file()
    ]
    config = dict(config) if config is not None else _read_config(folder)
    if save_tokenizer is None and _is_byte_lm(config) and not (folder / "tokenizer_config.json").is_file():
        try:
            save_byte_tokenizer(folder, config)
        except ValueError as err:  # e.g. a special token id that is not a byte: no tokenizer, no bytes claim
            warnings.warn(f"No byte-level tokenizer saved in {folder.name}: {err}", stacklevel=2)
    elif save_tokenizer:
        save_byte_tokenizer(folder, config)
    card = build_model_card(
        report=report,
        metrics=metrics,
        dataset_names=dataset_names,
        base_model=base_model,
        model_type_tag=model_type_tag,
        license=license,
        pipeline_tag=pipeline_tag,
        repo_id=repo_id,
        model_name=model_name,
        model_summary=relative_to_folder(model_summary, folder),
        language=language,
        tags=tags,
        config=config,
        plots=plots,
        training_summary=relative_to_folder(training_summary, folder),
        tokenizer_config=_read_config(folder, "tokenizer_config.json"),
    )
    card.save(folder / "README.md")
    logger.info("Wrote the model card to %s", folder / "README.md")
    return card
