"""``CompreSSMCallback`` on FSDP2 (``fully_shard``) models: 2 CPU processes, gloo, one torchrun launch.

transformers' Trainer runs DDP, not FSDP, on CPU, so ``tests/distributed/fsdp2_callback_train.py`` calls the
callback's hooks in the Trainer's order from a hand-written loop, with the callback bound to a stub of a
Trainer under FSDP2 (``model_wrapped`` = the sharded model itself). The launch trains, one after the other:
LRU on the default schedule (4 attempts in the first 10% of 40 steps), Mamba and Mamba-2 on explicit steps
(surrogate statistics pooled over the ranks; Mamba also saves a checkpoint after its last cut), an LRU run
whose rank 1 holds a NaN in its own shard at the first attempt, and ``mode="pragmatic"`` (refused).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_ddp_training import HERE
from torchrun_runs import assert_reloads, launch_runs

pytestmark = pytest.mark.distributed

SCRIPT = HERE / "fsdp2_callback_train.py"
RUNS = {
    "lru": dict(model="lru", state_size=12, max_steps=40, callback={"tau": 0.1}),  # the default schedule
    "mamba": dict(
        model="mamba",
        state_size=8,
        max_steps=10,
        callback={"tau": 0.3, "steps": [4, 8], "statistics_steps": 2},
        save_step=8,
    ),
    "mamba2": dict(
        model="mamba2",
        state_size=16,
        max_steps=10,
        callback={"tau": 0.3, "steps": [4, 8], "statistics_steps": 2},
    ),
    "lru_nan": dict(
        model="lru",
        state_size=12,
        max_steps=8,
        callback={"tau": 0.1, "steps": [3, 6]},
        nan={"rank": 1, "step": 3},
    ),
    "pragmatic": dict(model="lru", pragmatic=True),
}
TRAINED = ["lru", "mamba", "mamba2", "lru_nan"]
LOG_KEY = "compressm/mean_state_size"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(folder, {name: [rank 0 result, rank 1 result]})`` of one torchrun launch over every run."""
    tmp = tmp_path_factory.mktemp("fsdp2_callback")
    results = launch_runs(SCRIPT, RUNS, tmp)
    return tmp, results


def _cuts(result) -> list[dict]:
    return [e for e in result["history"] if e["kind"] == "reduction" and not e.get("skipped")]


def _decisions(result) -> list:
    """What every rank must agree on of each event (not its timings)."""
    return [
        (e["step"], e["sizes_after"], [(layer["n_after"], layer.get("reason")) for layer in e["layers"]])
        for e in result["history"]
    ]


@pytest.mark.parametrize("name", TRAINED)
def test_cuts_at_the_scheduled_steps_on_both_ranks(runs, name):
    r0, r1 = runs[1][name]
    expected = RUNS[name]["callback"].get("steps") or [1, 2, 3, 4]  # default: 4 attempts in 10% of 40 steps
    for result in (r0, r1):
        assert result["world"] == 2
        assert result["schedule_steps"] == expected
        assert result["done_steps"] == expected
        assert [e["step"] for e in result["history"]] == expected
        cuts = _cuts(result)
        assert cuts and all(e["layers_reduced"] > 0 for e in cuts), result["history"]
        original = [RUNS[name]["state_size"]] * 2
        assert result["history"][0]["sizes_before"] == original
        assert result["history"][-1]["sizes_after"] == result["sizes"]
        assert sum(result["sizes"]) < sum(original)
        assert result["config_state_sizes"] == result["sizes"]
        compression = result["config_compression"]
        assert compression["original_sizes"] == original
        assert [(e["step"], e["sizes"]) for e in compression["events"]] == [
            (e["step"], e["sizes_after"]) for e in result["history"]
        ]
    assert _decisions(r0) == _decisions(r1)


@pytest.mark.parametrize("name", TRAINED)
def test_full_parameters_bit_identical_across_ranks(runs, name):
    r0, r1 = runs[1][name]
    assert r0["params"].keys() == r1["params"].keys()
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), f"{key} differs across ranks"
    assert torch.equal(r0["logits"], r1["logits"])
    assert (
        r0["optimizer_holds_model_params"] and r1["optimizer_holds_model_params"]
    )  # the new shards train on


@pytest.mark.parametrize("name", TRAINED)
def test_each_rank_holds_fewer_bytes_after_a_cut(runs, name):
    for result in runs[1][name]:
        cut_steps = {e["step"] for e in _cuts(result)}
        for entry in result["bytes"]:
            before, after = entry["before"], entry["after"]
            if entry["step"] in cut_steps:
                assert after["params"] < before["params"] and after["optimizer"] < before["optimizer"], entry
            else:
                assert after == before, entry


@pytest.mark.parametrize("name", TRAINED)
def test_logged_and_reported_by_rank_zero(runs, name):
    tmp, results = runs
    for result in results[name]:
        logged = [h for h in result["log_history"] if LOG_KEY in h]
        assert [h["step"] for h in logged] == [e["step"] for e in result["history"]]
        assert logged[-1][LOG_KEY] == pytest.approx(sum(result["sizes"]) / len(result["sizes"]))
    report = json.loads((tmp / name / "compression_report.json").read_text())
    r0 = results[name][0]
    assert report["original_sizes"] == [RUNS[name]["state_size"]] * 2
    assert report["final_sizes"] == r0["sizes"]
    assert report["schedule_steps"] == r0["schedule_steps"]
    assert [(e["step"], e["sizes_after"]) for e in report["events"]] == [
        (e["step"], e["sizes_after"]) for e in r0["history"]
    ]


@pytest.mark.parametrize("name", TRAINED)
def test_saved_model_loads_at_compressed_sizes(runs, name):
    tmp, results = runs
    r0 = results[name][0]
    config = json.loads((tmp / name / "model" / "config.json").read_text())
    assert config["compression"]["events"] == r0["config_compression"]["events"]
    assert_reloads(tmp / name / "model", r0)


def test_checkpoint_holds_the_report_of_its_step(runs):
    from transformers import AutoModelForCausalLM

    import compressm_hf  # noqa: F401

    tmp, results = runs
    checkpoint = tmp / "mamba" / "checkpoint-8"
    report = json.loads((checkpoint / "compression_report.json").read_text())
    r0 = results["mamba"][0]
    assert (
        report["final_sizes"]
        == r0["sizes"]
        == list(AutoModelForCausalLM.from_pretrained(checkpoint).config.state_sizes)
    )
    assert [e["step"] for e in report["events"]] == [4, 8]


def test_nan_in_one_ranks_shard_skips_the_attempt_on_both_ranks(runs):
    r0, r1 = runs[1]["lru_nan"]
    assert r0["nan_param"] is None and r1["nan_param"] is not None  # only rank 1's shard held the NaN
    for result in (r0, r1):
        skipped, cut = result["history"]
        assert skipped["step"] == 3 and skipped["layers_reduced"] == 0
        assert skipped["sizes_before"] == skipped["sizes_after"] == [12, 12]
        assert "non-finite" in skipped["skipped"] and r1["nan_param"] in skipped["skipped"]
        assert cut["step"] == 6 and cut["layers_reduced"] > 0  # the run goes on; the next attempt cuts
        assert [(h["step"], h["at"], h["action"]) for h in result["health"]] == [(3, "attempt", "skipped")]
        assert any(r1["nan_param"] in message for message in result["nonfinite_warnings"])
        skipped_logs = [h for h in result["log_history"] if h.get("compressm/attempt_skipped")]
        assert [h["step"] for h in skipped_logs] == [3]
        assert [e["sizes"] for e in result["config_compression"]["events"]] == [[12, 12], cut["sizes_after"]]


def test_pragmatic_mode_is_refused_at_train_begin(runs):
    for rank, result in enumerate(runs[1]["pragmatic"]):
        assert result["rank"] == rank
        kind, message = result["error"]
        assert kind == "ValueError"
        assert "mode='pragmatic'" in message and "FSDP2" in message and "mode='tolerance'" in message
