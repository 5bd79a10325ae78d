"""Local ``evaluate`` metric modules.

``evaluate.load("accuracy")`` fetches its script from the Hub and fails offline. The modules here are
ordinary ``evaluate.Metric`` scripts shipped inside the package; :func:`load_metric` loads them by path,
so ``compute_metrics`` functions work on air-gapped machines exactly as with the Hub versions.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
AVAILABLE_METRICS = tuple(sorted(p.name for p in _HERE.iterdir() if (p / f"{p.name}.py").is_file()))


def metric_path(name: str) -> str:
    """Filesystem path of the packaged metric script ``name`` (one of :data:`AVAILABLE_METRICS`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; packaged metrics are {list(AVAILABLE_METRICS)}.")
    return str(_HERE / name / f"{name}.py")


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a packaged metric, offline. ``kwargs`` go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
