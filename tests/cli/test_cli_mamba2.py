"""``compressm-train --architecture mamba2`` and ``compressm-analyze`` on Mamba-2 folders (ours and stock)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from compressm_hf.cli import analyze, train

from .conftest import TINY_MODEL
from .helpers import assert_model_folder, run_main, usage_error

# 2 groups of 2 heads (d_inner 32 = 4 heads * head_dim 8), two SSD chunks per 32-byte block
TINY_MAMBA2 = [
    *TINY_MODEL,
    "--architecture",
    "mamba2",
    "--head_dim",
    "8",
    "--n_groups",
    "2",
    "--chunk_size",
    "16",
]
CALIBRATION = ["--block_size", "32", "--calibration_batches", "2", "--batch_size", "4"]


@pytest.fixture(scope="module")
def trained_mamba2(tmp_path_factory, tiny_text):
    """``compressm-train --architecture mamba2`` (in-process) on the tiny text; ``(output_dir, stdout)``."""
    out = tmp_path_factory.mktemp("runs") / "tiny-mamba2"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = train.main(
            ["--output_dir", str(out), "--dataset", str(tiny_text), "--disable_tqdm", "true", *TINY_MAMBA2]
        )
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def stock_mamba2(tmp_path_factory):
    """A random tiny stock transformers ``Mamba2ForCausalLM`` (2 groups) saved locally (never from the Hub)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=256, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, num_heads=4,
        n_groups=2, chunk_size=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("stock") / "stock-mamba2"
    Mamba2ForCausalLM(config).eval().save_pretrained(path)
    return path


def _sizes(model) -> list[int]:
    return [int(block.mixer.state_size) for block in model.backbone.layers]


# ------------------------------------------------------------------------------------------- train


def test_train_help_lists_mamba2_and_its_head_layout():
    text = train.build_parser().format_help()
    assert "{mamba,mamba2,lru}" in text
    for flag in ("--head_dim", "--num_heads", "--n_groups", "--chunk_size"):
        assert flag in text


def test_train_mamba2_defaults_are_the_shakespeare_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    model_args, *_, training_args = train.parse_args(["--architecture", "mamba2"])
    config = train.new_model_config(model_args)
    assert type(config).__name__ == "CompreSSMMamba2Config"
    assert (config.hidden_size, config.num_hidden_layers, config.state_sizes) == (128, 4, [64] * 4)
    assert (config.head_dim, config.num_heads, config.n_groups, config.expand) == (32, 8, 1, 2)
    assert config.vocab_size == 256 and config.pad_token_id == config.eos_token_id == 0
    assert training_args.output_dir.endswith("shakespeare-mamba2")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--head_dim", "7"], "--head_dim 7 does not divide d_inner"),
        (["--num_heads", "3"], "must equal d_inner"),
        (["--n_groups", "3"], "--n_groups 3 must divide"),
        (["--chunk_size", "0"], "--chunk_size must be >= 1"),
    ],
)
def test_train_mamba2_bad_head_layout_is_a_usage_error(extra, message, capsys, tmp_path):
    argv = ["--output_dir", str(tmp_path / "o"), "--architecture", "mamba2", "--hidden_size", "16", *extra]
    assert message in usage_error(train.main, argv, capsys)


def test_train_mamba2_compresses_and_loads_with_auto_classes(trained_mamba2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressm_hf.modeling import CompreSSMByteTokenizer
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM

    out, stdout = trained_mamba2
    sizes = assert_model_folder(out)
    assert "mamba2 on tiny.txt" in stdout and all(n < 8 for n in sizes)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "compressm_mamba2"
    assert (config["num_heads"], config["head_dim"], config["n_groups"], config["chunk_size"]) == (
        4,
        8,
        2,
        16,
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, CompreSSMMamba2ForCausalLM) and _sizes(model) == sizes
    for block, n in zip(model.backbone.layers, sizes):  # x, B, C channels of the conv: d_inner + 2 G n
        assert block.mixer.conv1d.weight.shape[0] == 32 + 2 * 2 * n
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, CompreSSMByteTokenizer)
    ids = tokenizer("to be", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 256)
    record = json.loads((out / "compressm_train_args.json").read_text())
    assert record["model"]["architecture"] == "mamba2" and record["model"]["head_dim"] == 8


def test_train_continues_a_stock_mamba2_folder(stock_mamba2, tiny_text, tmp_path):
    out = tmp_path / "continued"
    argv = ["--output_dir", str(out), "--model_name_or_path", str(stock_mamba2), "--dataset", str(tiny_text)]
    short = [
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "4",
        "--max_eval_blocks",
        "2",
        "--max_steps",
        "2",
    ]
    rc, stdout = run_main(train.main, [*argv, "--disable_tqdm", "true", "--no_compression", *short])
    assert rc == 0 and "mamba2 (2 layers, hidden 16, state sizes [8, 8]" in stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "compressm_mamba2"
    assert json.loads((out / "compressm_train_args.json").read_text())["model"]["architecture"] == "mamba2"


# ----------------------------------------------------------------------------------------- analyze


def test_spectrum_of_trained_mamba2(trained_mamba2, tiny_text, tmp_path):
    from compressm_hf import RankPolicy
    from compressm_hf.planning import planned_size

    out, _ = trained_mamba2
    plot, js = tmp_path / "spec.png", tmp_path / "spec.json"
    argv = ["spectrum", str(out), "--dataset", str(tiny_text), *CALIBRATION, "--taus", "0.01", "0.3"]
    rc, stdout = run_main(analyze.main, [*argv, "--plot", str(plot), "--json", str(js)])
    assert rc == 0
    assert "mamba2, 2 layers" in stdout and "not a bound for the kept subset" in stdout
    assert plot.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert data["kind"] == "mamba2"
    assert [layer["n"] for layer in data["layers"]] == json.loads((out / "config.json").read_text())[
        "state_sizes"
    ]
    for layer in data["layers"]:
        scores = torch.tensor(layer["scores"], dtype=torch.float64)
        assert layer["rule"] == "grouped" and scores.shape == (layer["n"],)
        assert bool((scores[:-1] >= scores[1:]).all()) and float(scores.min()) >= 0
        strict, loose = layer["ranks"]
        assert loose["rank"] <= strict["rank"] <= layer["n"]
        assert loose["rank"] == planned_size(scores, RankPolicy(tau=0.3))  # the rank compress would cut to


def test_compress_trained_mamba2_keeps_a_subset_and_reports_both_energies(
    trained_mamba2, tiny_text, tmp_path
):
    from transformers import AutoModelForCausalLM

    out, _ = trained_mamba2
    dst = tmp_path / "post"
    before = json.loads((out / "config.json").read_text())["state_sizes"]
    argv = ["compress", str(out), "--tau", "0.5", "--output_dir", str(dst), "--dataset", str(tiny_text)]
    rc, stdout = run_main(analyze.main, [*argv, *CALIBRATION, "--eval_blocks", "4"])
    assert rc == 0
    assert "validation perplexity" in stdout and "HSV rule promised" in stdout
    after = assert_model_folder(dst)
    assert all(a <= b for a, b in zip(after, before)) and sum(after) < sum(before)
    assert _sizes(AutoModelForCausalLM.from_pretrained(dst)) == after
    report = json.loads((dst / "compression_report.json").read_text())
    reduced = [layer for layer in report["events"][0]["layers"] if layer["reduced"]]
    assert reduced
    for layer in reduced:
        extra = layer["extra"]
        assert 0 < extra["energy_kept_subset"] <= 1 and 0 < extra["energy_promised"] <= 1
        assert extra["error_bound_applies"] is False and layer["energy_kept"] == extra["energy_kept_subset"]


def test_analyze_stock_transformers_mamba2(stock_mamba2, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    base = ["--dataset", str(tiny_text), *CALIBRATION]
    rc, stdout = run_main(analyze.main, ["spectrum", str(stock_mamba2), *base])
    assert rc == 0 and "mamba2, 2 layers, state sizes [8, 8]" in stdout
    dst = tmp_path / "stock-compressed"
    argv = [
        "compress",
        str(stock_mamba2),
        "--tau",
        "0.4",
        "--output_dir",
        str(dst),
        *base,
        "--eval_blocks",
        "2",
    ]
    rc, stdout = run_main(analyze.main, argv)
    assert rc == 0
    sizes = assert_model_folder(dst)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "compressm_mamba2"
    assert all(n < 8 for n in sizes)
    assert _sizes(AutoModelForCausalLM.from_pretrained(dst)) == sizes


def test_compress_stock_mamba2_without_a_cut_converts_it_unchanged(stock_mamba2, tiny_text, tmp_path):
    """tau 0 keeps every state (the gate refuses): the folder is the stock model as compressm_mamba2."""
    from transformers import AutoModelForCausalLM, Mamba2ForCausalLM

    dst = tmp_path / "converted"
    argv = [
        "compress",
        str(stock_mamba2),
        "--tau",
        "0",
        "--output_dir",
        str(dst),
        "--dataset",
        str(tiny_text),
    ]
    rc, _ = run_main(analyze.main, [*argv, *CALIBRATION, "--eval_blocks", "0"])
    assert rc == 0
    assert json.loads((dst / "config.json").read_text())["model_type"] == "compressm_mamba2"
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    stock = Mamba2ForCausalLM.from_pretrained(stock_mamba2).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            converted(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    assert _sizes(converted) == [8, 8]
