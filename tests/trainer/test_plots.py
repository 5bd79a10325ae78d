"""hsv_spectra.png shows every compression event of each layer, labelled, not only the first."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressm_hf.trainer.plots import events_per_layer, hsv_spectra_figure, plot_hsv_spectra

pytest.importorskip("matplotlib")


def _layer(idx, n_before, n_after, *, spectrum=True):
    entry = {"layer_idx": idx, "n_before": n_before, "n_after": n_after, "reduced": n_after < n_before}
    if spectrum:
        entry.update(
            hsv=[2.0 ** (-k) for k in range(n_before)], energy_kept=0.97, error_bound=0.1, rule="balanced"
        )
    else:
        entry["reason"] = "skipped: unstable"
    return entry


def _report():
    """Three events; layer 1 is skipped (no spectrum) at the second one."""
    events = [
        (10, [_layer(0, 16, 12), _layer(1, 16, 10)]),
        (20, [_layer(0, 12, 9), _layer(1, 10, 10, spectrum=False)]),
        (30, [_layer(0, 9, 7), _layer(1, 10, 8)]),
    ]
    return {
        "config": {"tau": 0.1, "mode": "tolerance"},
        "original_sizes": [16, 16],
        "final_sizes": [7, 8],
        "events": [
            {
                "kind": "reduction",
                "step": step,
                "sizes_after": [layers[0]["n_after"], layers[1]["n_after"]],
                "layers": layers,
            }
            for step, layers in events
        ],
    }


def test_events_per_layer_lists_every_event_with_a_spectrum():
    per_layer = events_per_layer(_report())
    assert [step for step, _ in per_layer[0]] == [10, 20, 30]
    assert [step for step, _ in per_layer[1]] == [10, 30]


def test_the_hsv_figure_draws_and_labels_every_event():
    fig = hsv_spectra_figure(_report())
    panel0, panel1 = fig.axes[:2]
    labels = [t.get_text() for t in panel0.get_legend().get_texts()]
    assert [label.split(":")[0] for label in labels] == ["step 10", "step 20", "step 30"]
    assert labels[-1].startswith("step 30: 9 \u2192 7")
    # one spectrum per event (each as long as the layer was then) and one cut line per event
    spectra = [line for line in panel0.get_lines() if len(line.get_xdata()) > 2]
    assert sorted(len(line.get_xdata()) for line in spectra) == [9, 12, 16]
    assert len(panel0.get_lines()) == 2 * 3
    assert panel0.get_title() == "layer 0: 16 \u2192 7 (3 events)"
    assert panel1.get_title() == "layer 1: 16 \u2192 8 (2 events)"
    assert "every compression event" in fig._suptitle.get_text()


def test_plot_hsv_spectra_writes_a_png(tmp_path):
    path = plot_hsv_spectra(_report(), tmp_path / "hsv.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
