"""Model card and plots: the card parses, its metadata and tables carry the report's numbers."""

from __future__ import annotations

import json
import struct

import pytest
from hub_test_utils import make_report
from huggingface_hub import ModelCard

from compressm_hf.trainer.model_card import write_model_card
from compressm_hf.trainer.plots import normalize_report, plot_hsv_spectra, plot_state_sizes

LRU_CONFIG = {
    "model_type": "compressm_lru",
    "architectures": ["LRUForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_lru.LRUConfig",
        "AutoModelForCausalLM": "modeling_lru.LRUForCausalLM",
    },
}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("report_py_format", [False, True])
def test_plots_are_written(tmp_path, report_py_format):
    report = make_report(n_layers=3, report_py_format=report_py_format)
    w, h = _png_size(plot_hsv_spectra(report, tmp_path / "a" / "hsv.png") and tmp_path / "a" / "hsv.png")
    assert w > 600 and h > 300
    w, h = _png_size(
        plot_state_sizes(report, tmp_path / "sizes.png", max_steps=40) and tmp_path / "sizes.png"
    )
    assert w > 600 and h > 400
    # reports without events still give a (readable) figure
    plot_hsv_spectra({"events": []}, tmp_path / "empty.png")
    plot_state_sizes({"original_state_sizes": [4, 4], "events": []}, tmp_path / "empty_sizes.png")
    assert _png_size(tmp_path / "empty.png")[0] > 0


def test_normalize_reads_both_report_formats():
    flat = normalize_report(make_report())
    nested = normalize_report(make_report(report_py_format=True))
    for key in ("tau", "mode", "original_state_sizes", "final_state_sizes"):
        assert flat[key] == nested[key]
    assert [e["layer"] for e in nested["events"][0]["layers"]] == [0, 1]
    assert flat["final_state_sizes"] == [5, 4]


def test_card_metadata_and_tables(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LRU_CONFIG))
    report = make_report()
    card = write_model_card(
        folder,
        report=report,
        metrics={"eval_loss": 2.3456789, "perplexity": 10.44},
        dataset_names=["wikitext"],
        base_model="user/base-lru",
        repo_id="user/tiny-lru",
        license="mit",
    )
    for name in ("README.md", "compression_report.json", "hsv_spectra.png", "state_sizes.png"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "compression_report.json").read_text()) == report

    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "text-generation"
    assert loaded.data.license == "mit"
    assert loaded.data.datasets == ["wikitext"]
    assert loaded.data.base_model == "user/base-lru"
    assert loaded.data.tags == ["compressm", "state-space-model", "lru", "compressed"]
    assert loaded.data.compressm["original_state_sizes"] == [6, 6]
    assert loaded.data.compressm["final_state_sizes"] == [5, 4]
    assert loaded.data.compressm["tau"] == 0.05
    assert str(card) == str(loaded)

    text = loaded.text
    # per-layer summary and one row per (event, layer) with the report's numbers
    assert "| 0 | 6 | 5 | 83% |" in text
    assert "| 1 | 6 | 4 | 67% |" in text
    layer1 = report["events"][0]["layers"][1]
    assert (
        f"| 10 | 1 | 6 → 4 | {layer1['energy_kept']:.2%} | {layer1['error_bound']:.3g} | tolerance | largest |"
        in text
    )
    assert "| 20 | 0 | 5 → 5 | no cut |" in text
    assert "| eval_loss | 2.346 |" in text and "| perplexity | 10.44 |" in text
    assert "![" in text and "(hsv_spectra.png)" in text and "(state_sizes.png)" in text
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-lru", trust_remote_code=True)' in text
    assert "from compressm_hf import LRUForCausalLM" in text
    assert "2510.02823" in text and "@inproceedings{chahine2026compressm" in text


def test_card_without_report_or_config(tmp_path):
    card = write_model_card(
        tmp_path, model_type_tag="mamba", pipeline_tag="text-classification", license=None
    )
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.tags == ["compressm", "state-space-model", "mamba"]
    assert loaded.data.pipeline_tag == "text-classification"
    assert "No compression report" in card.text
    assert not (tmp_path / "hsv_spectra.png").exists()


def test_card_picks_up_report_already_in_folder(tmp_path):
    (tmp_path / "compression_report.json").write_text(json.dumps(make_report(report_py_format=True)))
    card = write_model_card(tmp_path, make_plots=False)
    assert card.data.compressm["final_state_sizes"] == [5, 4]
    assert not (tmp_path / "hsv_spectra.png").exists()


def test_card_names_paths_relative_to_its_folder(tmp_path):
    folder = tmp_path / "model"
    summary = f"Saved to {folder}/ every 10 steps: {folder}/checkpoint-10, {folder.resolve()}/checkpoint-20."
    card = write_model_card(
        folder, report=make_report(), training_summary=summary, model_summary=f"In {folder}."
    )
    text = (folder / "README.md").read_text()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert "Saved to ./ every 10 steps: checkpoint-10, checkpoint-20." in text and "In ./." in text
    assert str(tmp_path) not in card.content
