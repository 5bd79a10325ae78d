"""benchmarks/bench_mamba_shakespeare.py: the Mamba-2 switch and the JSONL summary (no training)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_mamba_shakespeare")
    finally:
        sys.path.remove(str(BENCH))


def _args(**kw):
    base = dict(architecture="mamba2", hidden=32, layers=2, head_dim=16, n_groups=2, block_size=32)
    return types.SimpleNamespace(**{**base, **kw})


def test_build_model_mamba2_shape(bench):
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM

    model = bench.build_model(_args(), [8, 4], seed=0)
    assert isinstance(model, CompreSSMMamba2ForCausalLM)
    assert (model.config.num_heads, model.config.head_dim, model.config.n_groups) == (4, 16, 2)
    assert list(model.config.state_sizes) == [8, 4]


def test_build_model_rejects_bad_head_dim(bench):
    with pytest.raises(SystemExit, match="--head-dim 24"):
        bench.build_model(_args(head_dim=24), [8, 8], seed=0)


def test_summarize_paired_difference(bench, tmp_path, capsys):
    ppl = {"full": [5.0, 5.1, 5.2], "compressm": [5.1, 5.3, 5.3], "scratch": [5.2, 5.4, 5.5]}
    path = tmp_path / "runs.jsonl"
    with path.open("w") as f:
        for label, values in ppl.items():
            for seed, q in enumerate(values):
                sizes = [128, 128] if label == "full" else [40, 50]
                rec = dict(
                    label=label,
                    seed=seed,
                    command="cmd",
                    ppl=q,
                    state_sizes=sizes,
                    train_s=10.0 + seed,
                    train_cpu_s=9.0,
                    probe_gflops=[80.0, 90.0],
                    load_avg=[1.0, 2.0],
                )
                f.write(json.dumps(rec) + "\n")
    out = bench.summarize([str(path)])
    table = capsys.readouterr().out
    assert "| compressm | 3 | 5.233 ± 0.115 | [40, 50] |" in table
    ci = out["compressm_minus_scratch"]
    assert ci["seeds"] == [0, 1, 2]
    assert ci["mean"] == pytest.approx(-0.1333333, abs=1e-6)
    assert ci["low"] < ci["mean"] < ci["high"]
    assert out["rows"]["full"]["train_s"] == [10.0, 11.0, 12.0]
