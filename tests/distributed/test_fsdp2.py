"""CompreSSM cuts of FSDP2 (``fully_shard``) models: 2 CPU processes, gloo, torchrun, a plain training loop.

One torchrun launch (a 2-process start costs ~10-20 s on a small machine) trains, one after the other, LRU
(balanced truncation; optimizer state sliced, and once reset), Mamba (modal, surrogate statistics) and
Mamba-2 (grouped modal), each with two cuts (``tests/distributed/fsdp2_train.py``:
``compress_fully_sharded`` at the scheduled steps). The same runs in this process, without FSDP
(``compress_model`` + ``transplant_optimizer_state`` on the same global batches), are the reference.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_ddp_training import HERE
from torchrun_runs import assert_reloads, launch_runs

pytestmark = pytest.mark.distributed

SCRIPT = HERE / "fsdp2_train.py"
RUNS = {
    "lru": dict(model="lru", state_size=12, tau=0.1, steps=[3, 6]),
    "lru_reset": dict(
        model="lru", state_size=12, tau=0.1, steps=[3, 6], optimizer_state="reset", max_steps=8
    ),
    "mamba": dict(model="mamba", state_size=8, tau=0.3, steps=[4, 8]),
    "mamba2": dict(model="mamba2", state_size=16, tau=0.3, steps=[4, 8]),
    # one FSDP unit for the whole model (the mixers' parameters share their group with the embedding), and
    # compress_fully_sharded given the RankPolicy itself instead of a planning function
    "mamba_root": dict(
        model="mamba", state_size=8, tau=0.3, steps=[4, 8], wrap="root", planner="policy", max_steps=9
    ),
}
# The FSDP run averages two per-rank mean gradients (reduce-scatter) where the reference takes one mean over
# the same 8 sequences: the float32 sums run in another order (~1e-7 relative per step), and Adam (which
# divides by sqrt(v)) and the cuts' float64 eigen-decompositions of float32 weights carry that through
# 10 steps; measured: at most 1.4e-5 absolute / 9e-4 relative (LRU), 5e-7 (Mamba, Mamba-2). Same tolerance
# as the DDP world-size test.
RTOL, ATOL = 1e-3, 1e-4


def _driver():
    spec = importlib.util.spec_from_file_location("compressm_fsdp2_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    results = launch_runs(SCRIPT, RUNS, tmp)
    driver = _driver()
    references = {name: driver.run(dict(cfg)) for name, cfg in RUNS.items()}
    return tmp, results, references


def _discrete(layer: dict) -> dict:
    return {
        k: layer.get(k)
        for k in ("layer_idx", "n_before", "n_after", "reduced", "rule", "selection", "reason")
    }


@pytest.mark.parametrize("name", sorted(RUNS))
def test_ranks_agree_bit_for_bit_after_cuts(runs, name):
    _, results, _ = runs
    r0, r1 = results[name]
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["sizes"] == r1["sizes"]
    assert r0["params"].keys() == r1["params"].keys()
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), f"{key} differs across ranks"
    for key, moments in r0["moments"].items():
        for slot, value in moments.items():
            assert torch.equal(value, r1["moments"][key][slot]), (key, slot)
    assert [c["layers"] for c in r0["cuts"]] == [c["layers"] for c in r1["cuts"]]
    for c0, c1 in zip(r0["cuts"], r1["cuts"]):  # right after each cut, too
        for key, value in c0["params_after"].items():
            assert torch.equal(value, c1["params_after"][key]), (c0["step"], key)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_cuts_shrink_and_the_optimizer_follows(runs, name):
    _, results, _ = runs
    cfg = RUNS[name]
    for result in results[name]:
        cuts = result["cuts"]
        assert [c["step"] for c in cuts] == cfg["steps"]
        assert sum(cuts[0]["sizes_before"]) > sum(cuts[-1]["sizes_after"]) == sum(result["sizes"])
        assert all(n < cfg["state_size"] for n in result["sizes"]), result["sizes"]
        for cut in cuts:
            assert cut["optimizer_holds_model_params"]  # the new sharded parameters, in the old ones' places
            counts = cut["optimizer_counts"]
            assert counts["dropped"] == 0 and counts["swapped"] > 0
            if cfg.get("optimizer_state") == "reset":
                assert counts["reset"] > 0
            # this rank's bytes of the SSM layers' parameters + Adam state fall with the cut
            before, after = cut["bytes_before"], cut["bytes_after"]
            if cut["sizes_after"] != cut["sizes_before"]:
                assert after["params"] < before["params"] and after["optimizer"] < before["optimizer"], cut


@pytest.mark.parametrize("name", sorted(RUNS))
def test_equal_to_single_process_reference(runs, name):
    _, results, references = runs
    dist, other, ref = results[name][0], results[name][1], references[name]
    assert dist["sizes"] == ref["sizes"]
    assert [(c["step"], c["sizes_before"], c["sizes_after"]) for c in dist["cuts"]] == [
        (c["step"], c["sizes_before"], c["sizes_after"]) for c in ref["cuts"]
    ]
    for cut, other_cut, ref_cut in zip(dist["cuts"], other["cuts"], ref["cuts"]):
        assert [_discrete(layer) for layer in cut["layers"]] == [
            _discrete(layer) for layer in ref_cut["layers"]
        ]
        for layer, ref_layer in zip(cut["layers"], ref_cut["layers"]):
            if layer["reduced"]:
                assert layer["energy_kept"] == pytest.approx(ref_layer["energy_kept"], rel=1e-5)
        # each rank holds its shard of every SSM parameter: the shards add up to the whole (padding is not
        # counted); the moments are sharded too (each rank keeps its own scalar ``step`` per parameter)
        for when in ("bytes_before", "bytes_after"):
            assert cut[when]["params"] + other_cut[when]["params"] == ref_cut[when]["params"]
            assert max(cut[when]["optimizer"], other_cut[when]["optimizer"]) < ref_cut[when]["optimizer"]
    assert dist["params"].keys() == ref["params"].keys()
    for key, value in ref["params"].items():
        torch.testing.assert_close(dist["params"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    torch.testing.assert_close(dist["logits"], ref["logits"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_saved_full_state_dict_loads_at_compressed_sizes(runs, name):
    tmp, results, _ = runs
    folder = tmp / name / "model"
    assert not list(folder.glob("_fsdp_*.py")), "torch's FSDP sources were copied next to the weights"
    assert "FSDP" not in str(json.loads((folder / "config.json").read_text()).get("auto_map"))
    assert_reloads(folder, results[name][0])


def test_refuses_a_model_without_fully_shard_and_a_bad_mode():
    from compressm_hf.trainer.fsdp2 import compress_fully_sharded, is_fully_sharded
    from compressm_hf.trainer.statistics import pooled_statistics

    model = _driver().build_model({"model": "mamba", "state_size": 4, "seed": 0, "n_groups": 1})
    optimizer = torch.optim.AdamW(model.parameters())
    assert not is_fully_sharded(model)
    with pytest.raises(TypeError, match="fully_shard"):
        compress_fully_sharded(model, optimizer, {})
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        compress_fully_sharded(model, optimizer, {}, optimizer_state="keep")
    # one process: the pooled statistics are the layer's own (no statistics collected: None)
    layers = list(model.mixers())
    assert pooled_statistics(layers) == {0: None, 1: None}
