"""One set of defaults (trainer/defaults.py) for the callback and both CLIs, the summary's wall clock, the
recorded training data that compressm-analyze calibrates on, and a normal run without spurious warnings."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from compressm_hf import CompreSSMCallback, CompreSSMConfig
from compressm_hf.cli import analyze, clock, train
from compressm_hf.cli.train_record import RECORD_NAME, TrainingDataError, calibration_source
from compressm_hf.trainer import CompressionSchedule, defaults

from .conftest import TINY_MODEL
from .helpers import run_main

# -------------------------------------------------------------------------------------------- defaults


def test_the_callback_defaults_are_the_papers_from_one_place():
    assert (defaults.WINDOW, defaults.ATTEMPTS, defaults.GATE) == ((0.0, 0.1), 4, 0.95)
    # the settings live in CompreSSMConfig; CompreSSMCallback() is CompreSSMCallback(CompreSSMConfig())
    params = {f.name: f for f in dataclasses.fields(CompreSSMConfig)}
    assert CompreSSMCallback().config == CompreSSMConfig()
    for name, value in {
        "mode": defaults.MODE,
        "gate": defaults.GATE,
        "min_state_size": defaults.MIN_STATE_SIZE,
        "round_to": defaults.ROUND_TO,
        "selection": defaults.SELECTION,
        "fixed_fraction": defaults.FIXED_FRACTION,
        "optimizer_state": defaults.OPTIMIZER_STATE,
        "pragmatic_tolerance": defaults.PRAGMATIC_TOLERANCE,
        "statistics_steps": defaults.STATISTICS_STEPS,
    }.items():
        assert params[name].default == value, name
    assert CompressionSchedule().to_dict() == {"window": list(defaults.WINDOW), "attempts": defaults.ATTEMPTS}


def test_compressm_train_builds_the_callback_the_library_default_builds(tmp_path):
    _, comp_args, _, _ = train.parse_args(["--output_dir", str(tmp_path / "o")])
    assert comp_args.tau == defaults.CLI_TAU
    from_cli = train.make_callback(comp_args, seed=0).config_dict()
    assert from_cli == CompreSSMCallback(tau=defaults.CLI_TAU).config_dict()
    assert from_cli["schedule"] == {"window": [0.0, 0.1], "attempts": 4} and from_cli["min_state_size"] == 1


@pytest.mark.parametrize("command", ["spectrum", "compress"])
def test_compressm_analyze_uses_the_same_rank_policy_defaults(command):
    argv = [command, "model"] + (["--output_dir", "out", "--tau", "0.1"] if command == "compress" else [])
    args = analyze.build_parser().parse_args(argv)
    assert (args.gate, args.min_state_size, args.round_to) == (
        defaults.GATE,
        defaults.MIN_STATE_SIZE,
        defaults.ROUND_TO,
    )
    if command == "compress":
        assert (args.mode, args.fixed_fraction, args.selection) == (
            defaults.MODE,
            defaults.FIXED_FRACTION,
            defaults.SELECTION,
        )


def test_the_cli_warmup_is_the_compression_window(tmp_path):
    # the paper cuts inside the learning-rate warm-up
    _, comp_args, _, args = train.parse_args(["--output_dir", str(tmp_path / "o")])
    assert args.warmup_steps == comp_args.window[1] == defaults.WINDOW[1]


@pytest.mark.parametrize("architecture", ["mamba", "lru"])
def test_ddp_find_unused_parameters_is_off_because_every_parameter_gets_a_gradient(architecture, tmp_path):
    _, _, _, args = train.parse_args(["--output_dir", str(tmp_path / "o")])
    assert args.ddp_find_unused_parameters is False
    torch.manual_seed(0)
    model = train.build_model(
        train.ModelArguments(architecture=architecture, hidden_size=16, num_hidden_layers=2, state_size=4)
    )
    ids = torch.randint(0, 256, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


# ------------------------------------------------------------------------------------------ wall clock


def test_the_wall_clock_counts_from_process_start():
    since = clock.seconds_since_process_start()
    # this process started before the clock module was imported
    assert since is not None and since >= clock.time.monotonic() - clock._IMPORTED_AT - 0.05
    from_start = clock.WallClock(from_process_start=True)
    assert from_start.covers == "from process start" and from_start.elapsed() >= since - 0.05
    in_process = clock.WallClock()
    assert in_process.covers == "from the call of main()" and in_process.elapsed() < since


def test_the_wall_clock_without_proc_counts_from_the_import(monkeypatch):
    monkeypatch.setattr(clock, "seconds_since_process_start", lambda: None)
    fallback = clock.WallClock(from_process_start=True)
    assert fallback.origin == clock._IMPORTED_AT and "import" in fallback.covers


def test_the_summary_says_what_its_wall_time_covers():
    line = train.time_line(40.1, 87.6, "from process start")
    assert line == "training time: 40.1 s; total wall time: 87.6 s (from process start)"


# ---------------------------------------------------------------------------------------- training data


def _record(folder, **data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_NAME).write_text(json.dumps({"data": {"text_column": "text", **data}}))
    return folder


def test_calibration_source_uses_the_recorded_training_data(tmp_path):
    folder = _record(tmp_path / "m", dataset="shakespeare", source="builtin")
    dataset, column, split, how = calibration_source(folder, None, None)
    assert (dataset, column, split) == ("shakespeare", "text", "train") and RECORD_NAME in how
    hub = _record(tmp_path / "h", dataset="someone/corpus", source="datasets", dataset_split="validation")
    assert calibration_source(hub, None, None)[:3] == ("someone/corpus", "text", "validation")
    # an explicit --dataset wins
    assert calibration_source(folder, "other.txt", None)[::3] == ("other.txt", "--dataset")


def test_calibration_source_finds_a_local_file_recorded_inside_the_folder(tmp_path):
    folder = _record(tmp_path / "m", dataset="data/train.txt", source="local")
    (folder / "data").mkdir()
    (folder / "data" / "train.txt").write_text("hello")
    assert calibration_source(folder, None, None)[0] == str(folder / "data" / "train.txt")


def test_calibration_source_without_a_usable_record_asks_for_dataset(tmp_path):
    with pytest.raises(TrainingDataError, match="does not record what it was trained on.*--dataset"):
        calibration_source(tmp_path, None, None)
    folder = _record(tmp_path / "m", dataset="tiny.txt", source="local")
    with pytest.raises(TrainingDataError, match=r"recorded by name only.*--dataset PATH/tiny\.txt"):
        calibration_source(folder, None, None)


def test_analyze_calibrates_on_the_recorded_data_or_says_what_is_missing(
    trained_mamba, tiny_text, tmp_path, capsys
):
    out, _ = trained_mamba
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["data"]["dataset"] == tiny_text.name and record["data"]["source"] == "local"
    base = ["--block_size", "32", "--calibration_batches", "1"]
    # trained on a file outside the folder: recorded by name only, so the analysis asks for it
    assert analyze.main(["spectrum", str(out), *base]) == 2
    assert f"pass --dataset PATH/{tiny_text.name}" in capsys.readouterr().err
    # with the file inside (a copy of the folder), the recorded data are used
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.copy(tiny_text, copy / tiny_text.name)
    rc, stdout = run_main(analyze.main, ["spectrum", str(copy), *base])
    assert rc == 0 and f"of '{tiny_text.name}' (the training data recorded in {RECORD_NAME}" in stdout


def test_analyze_of_a_folder_without_a_record_requires_dataset(stock_mamba, capsys):
    assert analyze.main(["spectrum", str(stock_mamba)]) == 2
    assert "pass --dataset" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a normal run


@pytest.mark.slow
def test_a_normal_tiny_run_prints_no_spurious_warning(tmp_path, tiny_text):
    # a fresh process, as a user runs it: transformers warns once per process, and the wall clock starts at
    # the process start only when compressm-train is the program
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--dataset", str(tiny_text), "--disable_tqdm", "true", *TINY_MODEL]
    proc = subprocess.run(
        [sys.executable, "-m", "compressm_hf.cli.train", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for marker in ("causal_conv1d", "mamba_ssm", "much slower", "find_unused_parameters", "ShortRunWarning"):
        assert marker not in proc.stderr, proc.stderr[-3000:]
    # true and actionable: the one-off build of the C++ scan kernel (or waiting for another process's build)
    lines = [line for line in proc.stderr.splitlines() if "C++ selective-scan kernel" not in line]
    assert not [line for line in lines if re.search(r"Warning:|\bWARNING\b", line)], proc.stderr[-3000:]
    assert re.search(r"total wall time: [\d.]+ s \(from process start\)", proc.stdout), proc.stdout[-2000:]
