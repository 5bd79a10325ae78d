"""scripts/benchmark.py: --preset, --budget and --num-seeds handling, and one tiny run at equal size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from compressm_hf.trainer.baselines import HNNTrainer, balanced_truncate_

from .helpers import tiny_classifier, tiny_dataset, training_args

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"
PRESET = "paper_sequence_classification"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compressm_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage_error(bench, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_preset_gives_the_model_flags_and_explicit_flags_win(bench):
    from compressm_hf.modeling.lru import LRUConfig

    preset = getattr(LRUConfig, PRESET)()
    args = bench.parse_args(["--task", "mnist1d", "--preset", PRESET])
    assert (args.state_size, args.hidden_size, args.layers) == (
        preset.state_size,
        preset.hidden_size,
        preset.num_hidden_layers,
    )
    assert bench.base_config(args, num_labels=10).norm_type == preset.norm_type
    args = bench.parse_args(["--task", "mnist1d", "--preset", PRESET, "--state-size", "32", "--layers", "2"])
    config = bench.base_config(args, num_labels=4)
    assert (config.state_size, config.num_hidden_layers, config.num_labels) == (32, 2, 4)
    assert config.hidden_size == preset.hidden_size  # not given: the preset's
    # without a preset the old defaults hold
    args = bench.parse_args([])
    assert (args.state_size, args.hidden_size, args.layers, args.seeds, args.taus) == (
        64,
        32,
        2,
        [0, 1],
        [0.05, 0.1],
    )


def test_unknown_preset_and_lm_task_are_usage_errors(bench, capsys):
    err = _usage_error(bench, capsys, ["--preset", "paper_lm"])
    assert "no preset of that name" in err and PRESET in err
    err = _usage_error(bench, capsys, ["--preset", "get_config_dict"])  # a classmethod, but not a preset
    assert "no preset of that name" in err
    err = _usage_error(bench, capsys, ["--preset", PRESET, "--task", "shakespeare"])
    assert "language model" in err


def test_budget_and_seed_count(bench, capsys):
    args = bench.parse_args(["--budget", "40", "--num-seeds", "5"])
    assert args.seeds == [0, 1, 2, 3, 4] and args.taus == [] and args.budget == 40
    assert bench.parse_args(["--budget", "40", "--taus", "0.1"]).taus == [0.1]
    assert "at least one state per layer" in _usage_error(bench, capsys, ["--budget", "1"])
    assert "below the full model" in _usage_error(bench, capsys, ["--budget", "128"])  # 2 x 64
    assert "not allowed with" in _usage_error(bench, capsys, ["--seeds", "0", "--num-seeds", "2"])
    assert "--num-seeds must be >= 1" in _usage_error(bench, capsys, ["--num-seeds", "0"])
    assert bench.split_budget(7, 3) == [3, 2, 2]
    assert bench.top3_mean([0.5, 0.9, 0.7, 0.8, 0.6]) == pytest.approx(0.8)
    assert bench.top3_mean([5.0, 4.0, 3.0, 9.0], lower_is_better=True) == pytest.approx(4.0)
    assert bench.top3_mean([1.0, 2.0]) is None


def test_tiny_run_compares_every_method_at_the_budget(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_task", lambda args: (tiny_dataset(48, seed=0), tiny_dataset(16, seed=1)))
    argv = [
        "--task",
        "mnist1d",
        "--preset",
        PRESET,
        "--state-size",
        "8",
        "--layers",
        "2",
        "--hidden-size",
        "4",
    ]
    argv += ["--budget", "6", "--num-seeds", "1", "--max-steps", "8", "--batch-size", "8", "--threads", "1"]
    argv += ["--methods", "compressm", "scratch_small", "hnn", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0

    payload = json.loads((tmp_path / "benchmark_mnist1d.json").read_text())
    rows = {r["method"]: r for r in payload["runs"]}
    assert set(rows) == {"compressm(budget=6)", "scratch_small", "hnn"}
    compressed = rows["compressm(budget=6)"]
    assert sum(compressed["state_sizes"]) <= 6 and compressed["budget_taus"]
    assert rows["scratch_small"]["state_sizes"] == compressed["state_sizes"]  # exactly equal per layer
    assert sum(rows["hnn"]["state_sizes"]) == sum(compressed["state_sizes"])  # HNN: the same total
    assert payload["args"]["preset"] == PRESET and payload["args"]["budget"] == 6
    assert "state budget 6" in (tmp_path / "benchmark_mnist1d.md").read_text()


def test_hnn_truncates_to_a_budget(tmp_path):
    model = tiny_classifier(0)  # 2 layers of 8 states
    cut = balanced_truncate_(model, budget=7)
    assert sum(cut["sizes_after"]) <= 7 and 0.0 <= cut["tau"] < 1.0
    with pytest.raises(ValueError, match="exactly one of tau"):
        balanced_truncate_(model, tau=0.1, budget=5)
    with pytest.raises(ValueError, match="not both"):
        HNNTrainer(model=model, args=training_args(tmp_path), truncate_tau=0.1, truncate_budget=4)
