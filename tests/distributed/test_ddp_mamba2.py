"""CompreSSMCallback on Mamba-2 under DDP (2 CPU processes, gloo, torchrun): the ranks stay bit-identical.

One torchrun launch (a 2-process start costs ~10-20 s on a small machine) trains two tiny Mamba-2 LMs
(``tests/distributed/ddp_train.py``, ``model="mamba2"``: hidden 32, 2 layers, 8 heads of 8, d_state 16),
with one and with two groups, with statistics collected before cuts at steps 4 and 8. Same assertions as
the LRU / Mamba runs of ``test_ddp_training.py`` (same launcher helper), plus the Mamba-2 entries of the
report rank 0 writes.
"""

from __future__ import annotations

import pytest
from test_ddp_training import _assert_identical_ranks, _launch

from compressm_hf.trainer import read_report

pytestmark = pytest.mark.distributed

STATE, MAX_STEPS = 16, 10
RUNS = {
    f"mamba2_g{groups}": dict(
        model="mamba2", state_size=STATE, n_groups=groups, tau=0.3, steps=[4, 8], max_steps=MAX_STEPS
    )
    for groups in (1, 2)
}


@pytest.fixture(scope="module")
def mamba2_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun_mamba2")
    return tmp, _launch("torchrun", RUNS, tmp)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_mamba2_ranks_identical_after_cuts(mamba2_runs, name):
    tmp, results = mamba2_runs
    results = results[name]
    _assert_identical_ranks(results)  # parameters, optimizer state, sizes and history, bit for bit
    r0 = results[0]
    assert r0["global_step"] == MAX_STEPS
    reductions = [e for e in r0["history"] if e["kind"] == "reduction"]
    assert [e["step"] for e in reductions] == [4, 8] and reductions[0]["layers_reduced"] > 0
    assert r0["sizes"] == reductions[-1]["sizes_after"] and all(n < STATE for n in r0["sizes"]), r0["sizes"]
    # the report rank 0 wrote: the Mamba-2 entries of every cut layer
    report = read_report(tmp / name)
    assert report["original_sizes"] == [STATE, STATE] and report["final_sizes"] == r0["sizes"]
    cut = [layer for e in report["events"] for layer in e["layers"] if layer["reduced"]]
    assert cut
    for layer in cut:
        extra = layer["extra"]
        assert layer["rule"] == "modal" and extra["num_groups"] == RUNS[name]["n_groups"]
        assert extra["error_bound_applies"] is False
        assert 0 < layer["energy_kept"] <= 1 and extra["energy_promised"] >= 1 - 0.3 - 1e-9
