"""The compression report of a Mamba-2 cut: both energies per layer, and the kept one recomputed independently.

A probe callback placed before ``CompreSSMCallback`` copies, at the cut step, every layer's averaged
surrogate system (``mixer.lti_system()``, the statistics the callback plans from) and its ``in_proj``
weight; a second one, after it, copies the cut ``in_proj``. The kept state channels of every group are read
off the weights (which old rows the new ``in_proj`` holds), and the HSV share of the kept subsystems is
recomputed with ``compressm_hf.hankel_singular_values`` from the pre-cut system: it must equal the
report's ``energy_kept``.
"""

from __future__ import annotations

import pytest
import torch
from trainer.common import make_args, make_trainer
from transformers import TrainerCallback

from compressm_hf import hankel_singular_values
from compressm_hf.grouped import grouped_rank_scores
from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM
from compressm_hf.trainer import CompreSSMCallback, read_report

from .helpers import tiny_config

TAU, CUT_STEP, N = 0.3, 4, 16


class StepProbe(TrainerCallback):
    """At ``on_step_end`` of ``step``: each mixer's ``in_proj`` weight and, if asked, its surrogate system.

    Placed before CompreSSMCallback it sees the layers before the cut, placed after it the cut layers.
    """

    def __init__(self, step: int, systems: bool):
        self.step, self.want_systems = step, systems
        self.systems: list = []
        self.in_proj: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            if self.want_systems:
                self.systems = [mixer.lti_system() for mixer in model.mixers()]
            self.in_proj = [mixer.in_proj.weight.detach().clone() for mixer in model.mixers()]


def kept_states(
    before: torch.Tensor, after: torch.Tensor, d: int, groups: int, n: int, rank: int
) -> torch.Tensor:
    """The old state index of every kept B channel, read off the ``in_proj`` weights: ``(groups, rank)`` int64.

    ``in_proj`` rows are ``z | x | B | C | dt`` = ``d | d | G n | G n | heads``; the B row of state ``i`` of
    group ``g`` is ``2 d + g n + i`` before the cut and ``2 d + g rank + j`` after it. The C rows must name the
    same states (one keep set per group for B and C).
    """
    keep = torch.empty(groups, rank, dtype=torch.long)
    for g in range(groups):
        for j in range(rank):
            for block_before, block_after in ((2 * d, 2 * d), (2 * d + groups * n, 2 * d + groups * rank)):
                row = after[block_after + g * rank + j]
                old = before[block_before + g * n : block_before + (g + 1) * n]
                hits = torch.nonzero((old == row).all(dim=1)).flatten().tolist()
                if len(hits) != 1:
                    raise AssertionError(f"group {g} kept row {j} matches old states {hits}, expected one")
                if block_before == 2 * d:
                    keep[g, j] = hits[0]
                elif keep[g, j] != hits[0]:
                    raise AssertionError(f"group {g}: B keeps state {int(keep[g, j])} but C keeps {hits[0]}")
    return keep


def subset_energy(system, keep: torch.Tensor) -> float:
    """HSV sum of every head's kept-subset system over that of the full systems (``keep`` ``(G, rank)``)."""
    A, B, C = system.A, system.B, system.C
    full = hankel_singular_values(A, B, C, diagonal=False).sum()
    kept = sum(
        hankel_singular_values(A[g][:, :, k][:, k], B[g][:, k], C[g][:, :, k], diagonal=False).sum()
        for g, k in enumerate(keep)
    )
    return float(kept / full)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_report_holds_promised_and_kept_energy_of_every_mamba2_cut(tmp_path, n_groups):
    torch.manual_seed(0)
    model = CompreSSMMamba2ForCausalLM(tiny_config((N, N), n_groups=n_groups, vocab_size=12))
    before, after = StepProbe(CUT_STEP, systems=True), StepProbe(CUT_STEP, systems=False)
    cb = CompreSSMCallback(tau=TAU, steps=[CUT_STEP], statistics_steps=2)
    make_trainer(model, make_args(tmp_path, max_steps=CUT_STEP + 1), [before, cb, after]).train()

    (event,) = [e for e in read_report(tmp_path)["events"] if e["kind"] == "reduction"]
    reduced = [layer for layer in event["layers"] if layer["reduced"]]
    assert reduced, event["layers"]
    for layer in reduced:
        idx, rank = layer["layer_idx"], layer["n_after"]
        mixer = model.mixers()[idx]
        assert layer["n_before"] == N and rank == mixer.state_size < N
        extra = layer["extra"]
        assert extra["error_bound_applies"] is False and extra["num_groups"] == n_groups
        assert 0 < layer["energy_kept"] <= 1.0
        assert extra["energy_promised"] >= 1 - TAU - 1e-9
        assert extra["energy_kept_subset"] == layer["energy_kept"]
        # the spectrum in the report is that of the system the probe copied (the callback planned from it)
        system = before.systems[idx]
        torch.testing.assert_close(
            torch.tensor(layer["hsv"], dtype=torch.float64),
            grouped_rank_scores(system),
            rtol=1e-6,
            atol=1e-12,
        )
        # the kept subset, read off the weights, holds the reported energy of that system
        d = mixer.intermediate_size
        keep = kept_states(before.in_proj[idx], after.in_proj[idx], d, n_groups, N, rank)
        assert abs(subset_energy(system, keep) - layer["energy_kept"]) <= 1e-6
