"""Mamba-2 reduction: averaged surrogate statistics, per-head dense Gramians/HSVs, per-group keep sets, reduce_."""

from __future__ import annotations

import pytest
import torch

from compressm_hf import LTISystem, RankPolicy, hankel_singular_values
from compressm_hf.grouped import grouped_rank_scores, plan_grouped_reduction
from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM
from compressm_hf.modeling.mamba2.modeling_common import MissingStatisticsError
from compressm_hf.protocol import ReductionPlan

from .helpers import ids, logits, tiny_model


def collect(model, batches=2, length=12, mask=None):
    model.train()
    model.set_collect_statistics(True)
    with torch.no_grad():
        for i in range(batches):
            x = ids(2, length, seed=10 + i)
            model(x, attention_mask=None if mask is None else mask)
    model.set_collect_statistics(False)
    return model.eval()


def grouped_system(G=2, R=2, n=6, m=6, seed=0, scale=None) -> LTISystem:
    """Random heads with A = a I and full-rank B (n x m) and C (n x n)."""
    gen = torch.Generator().manual_seed(seed)
    a = 0.2 + 0.7 * torch.rand(G, R, generator=gen, dtype=torch.float64)
    A = a[..., None, None] * torch.eye(n, dtype=torch.float64)
    B = torch.randn(G, R, n, m, generator=gen, dtype=torch.float64)
    C = torch.randn(G, R, n, n, generator=gen, dtype=torch.float64)
    if scale is not None:  # (G, n) per-state scale of B rows and C columns
        B = B * scale[:, None, :, None]
        C = C * scale[:, None, None, :]
    return LTISystem(A=A, B=B, C=C, diagonal=False, reduction="grouped")


# ---------------------------------------------------------------------------------------------- surrogate


def test_lti_system_shapes_and_gramian_structure():
    model = collect(tiny_model((8, 4), n_groups=2))
    mixer = model.backbone.layers[1].mixer
    system = mixer.lti_system()
    assert (system.diagonal, system.reduction) == (False, "grouped")
    assert system.A.shape == system.B.shape == system.C.shape == (2, 2, 4, 4)  # (G, heads/G, N, N)
    a = torch.diagonal(system.A, dim1=-2, dim2=-1)
    assert torch.all((a > 0) & (a < 1)) and torch.allclose(a, a[..., :1].expand_as(a))  # a I
    assert torch.equal(system.A - torch.diag_embed(a), torch.zeros_like(system.A))
    # C is shared by the group's heads; B B^T and C^T C are PSD second-moment matrices
    assert torch.equal(system.C[:, 0], system.C[:, 1])
    BBt = system.B @ system.B.transpose(-1, -2)
    assert torch.linalg.eigvalsh(BBt).min() > -1e-10
    assert mixer.statistics_tokens == 2 * 2 * 12


def test_padding_tokens_do_not_enter_the_statistics():
    padded, plain = tiny_model((6,), n_groups=2), tiny_model((6,), n_groups=2)
    x = ids(1, 10, seed=3)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0  # row 1: three left-padding tokens, then the same sequence as row 0
    batch = torch.cat(
        [torch.cat([x, ids(1, 3, seed=4)], dim=1), torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)]
    )
    for model, inputs, m in ((padded, batch[1:], mask[1:]), (plain, x, None)):
        model.train().set_collect_statistics(True)
        with torch.no_grad():
            model(inputs, attention_mask=m)
    s1, s2 = padded.mixers()[0].lti_system(), plain.mixers()[0].lti_system()
    assert padded.mixers()[0].statistics_tokens == plain.mixers()[0].statistics_tokens == 10
    for name in ("A", "B", "C"):
        torch.testing.assert_close(getattr(s1, name), getattr(s2, name), atol=1e-6, rtol=1e-5)


def test_lti_system_without_statistics_raises():
    mixer = tiny_model((4,)).mixers()[0]
    with pytest.raises(MissingStatisticsError, match="collect_statistics"):
        mixer.lti_system()
    model = collect(tiny_model((4,)))
    model.mixers()[0].resize_(3)  # statistics of another state size are dropped
    with pytest.raises(MissingStatisticsError):
        model.mixers()[0].lti_system()


# ---------------------------------------------------------------------------------------------- planning


def test_head_hsvs_match_the_closed_form_of_a_scalar_decay():
    # A = a I: P = B B^T / (1 - a^2), Q = C^T C / (1 - a^2), so sigma = sqrt(eig(B B^T C^T C)) / (1 - a^2)
    s = grouped_system()
    a = s.A[..., 0, 0]
    M = s.B @ s.B.transpose(-1, -2) @ s.C.transpose(-1, -2) @ s.C
    closed = torch.linalg.eigvals(M).real.clamp(min=0).sqrt().sort(dim=-1, descending=True).values
    closed = closed / (1 - a**2)[..., None]
    hsv = hankel_singular_values(s.A, s.B, s.C, diagonal=False)
    torch.testing.assert_close(hsv, closed, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(grouped_rank_scores(s), closed.sum(dim=(0, 1)), atol=1e-7, rtol=1e-6)


def test_each_group_keeps_its_own_important_states():
    scale = torch.full((2, 6), 1e-3, dtype=torch.float64)
    scale[0, [1, 4]] = 1.0  # group 0 lives in states 1 and 4
    scale[1, [0, 2]] = 1.0  # group 1 in states 0 and 2
    plan = plan_grouped_reduction(grouped_system(scale=scale), RankPolicy(tau=0.05))
    assert plan is not None and plan.rank == 2 and plan.rule == "modal"
    assert plan.keep.tolist() == [[1, 4], [0, 2]]
    # (the Cholesky jitter of the Gramians can lift a ratio a hair above 1)
    assert 0.95 <= plan.extra["energy_promised"] <= 1 + 1e-5 and 0.95 <= plan.energy_kept <= 1 + 1e-5
    assert plan.extra["energy_kept_subset"] == plan.energy_kept and plan.extra["error_bound_applies"] is False
    # the ablation keeps the least important states and holds almost none of the energy
    worst = plan_grouped_reduction(grouped_system(scale=scale), RankPolicy(tau=0.05, selection="smallest"))
    assert worst.energy_kept < 0.01 < plan.energy_kept


def test_kept_energy_is_the_hsv_sum_of_the_kept_subsystems():
    s = grouped_system(seed=2)
    plan = plan_grouped_reduction(s, RankPolicy(tau=0.3))
    assert plan is not None
    full = hankel_singular_values(s.A, s.B, s.C, diagonal=False).sum()
    kept = 0.0
    for g in range(2):
        k = plan.keep[g]
        kept += hankel_singular_values(
            s.A[g][:, k][:, :, k], s.B[g][:, k], s.C[g][:, :, k], diagonal=False
        ).sum()
    assert plan.energy_kept == pytest.approx(float(kept / full), rel=1e-9)
    spectrum = grouped_rank_scores(s)
    assert plan.extra["energy_promised"] == pytest.approx(float(spectrum[: plan.rank].sum() / spectrum.sum()))


def test_gate_refuses_a_cut_that_is_too_small():
    assert plan_grouped_reduction(grouped_system(), RankPolicy(tau=1e-9)) is None


def test_plan_reduction_dispatches_grouped_systems():
    from compressm_hf import plan_reduction
    from compressm_hf.planning import rank_scores

    s = grouped_system(seed=2)
    policy = RankPolicy(tau=0.3)
    assert plan_reduction(s, policy).keep.tolist() == plan_grouped_reduction(s, policy).keep.tolist()
    torch.testing.assert_close(rank_scores(s), grouped_rank_scores(s))


# ---------------------------------------------------------------------------------------------- reduce_


def _zero_dropped_channels(model: CompreSSMMamba2ForCausalLM, layer: int, keep: torch.Tensor):
    """The model with every dropped B/C state channel of ``layer`` silenced (zero in_proj rows, zero conv)."""
    mixer = model.backbone.layers[layer].mixer
    d, G, N = mixer.intermediate_size, mixer.n_groups, mixer.state_size
    with torch.no_grad():
        for g in range(G):
            for i in range(N):
                if i in keep[g].tolist():
                    continue
                for channel in (d + g * N + i, d + G * N + g * N + i):  # its B and its C channel
                    mixer.in_proj.weight[d + channel] = 0
                    mixer.conv1d.weight[channel] = 0
                    mixer.conv1d.bias[channel] = 0
    return model


def test_reduce_keeps_per_group_subsets_exactly():
    model = collect(tiny_model((8, 6), n_groups=2))
    mixer = model.backbone.layers[0].mixer
    plan = plan_grouped_reduction(mixer.lti_system(), RankPolicy(tau=0.3))
    assert plan is not None and plan.rank < 8
    reference = _zero_dropped_channels(tiny_model((8, 6), n_groups=2), 0, plan.keep)
    old_params = {name: p.detach().clone() for name, p in mixer.named_parameters()}
    swaps = mixer.reduce_(plan)
    assert model.config.state_sizes == [plan.rank, 6] and mixer.state_size == plan.rank
    assert mixer.in_proj.weight.shape[0] == 2 * 32 + 2 * 2 * plan.rank + 4
    assert mixer.conv1d.weight.shape[0] == 32 + 2 * 2 * plan.rank
    assert {id(s.new) for s in swaps} == {
        id(mixer.in_proj.weight),
        id(mixer.conv1d.weight),
        id(mixer.conv1d.bias),
    }
    old_by_shape = {tuple(v.shape): v for v in old_params.values()}
    for swap in swaps:  # every new tensor copies the old rows named by its keep indices
        assert swap.state_dim == 0 and swap.keep.numel() == swap.new.shape[0]
        torch.testing.assert_close(swap.new, old_by_shape[tuple(swap.old.shape)][swap.keep], atol=0, rtol=0)
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=1e-5)
    assert mixer.statistics_tokens == 0  # statistics reset after a cut


def test_reduced_model_saves_and_loads_exactly(tmp_path):
    model = collect(tiny_model((8, 6), n_groups=2))
    for mixer in model.mixers():
        plan = plan_grouped_reduction(mixer.lti_system(), RankPolicy(tau=0.3))
        if plan is not None:
            mixer.reduce_(plan)
    model.save_pretrained(tmp_path)
    again = CompreSSMMamba2ForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.state_sizes == model.config.state_sizes
    x = ids()
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("plan_kwargs", "match"),
    [
        (dict(rule="balanced"), "rule='balanced'"),
        (dict(n=5), "plan.n=5"),
        (dict(keep=torch.tensor([[0, 1], [2, 3]]), rank=3), r"shape \(2, 2\)"),
        (dict(keep=torch.tensor([[0, 0, 1], [1, 2, 3]])), "distinct"),
        (dict(keep=torch.tensor([[0, 1, 8], [1, 2, 3]])), r"in \[0, 8\)"),
    ],
)
def test_reduce_refuses_plans_that_do_not_fit(plan_kwargs, match):
    mixer = tiny_model((8,), n_groups=2).mixers()[0]
    fields = dict(n=8, rank=3, hsv=torch.ones(8), energy_kept=1.0, error_bound=0.0, rule="modal")
    fields["keep"] = torch.tensor([[0, 1, 2], [3, 4, 5]])
    plan = ReductionPlan(**{**fields, **plan_kwargs})
    with pytest.raises(ValueError, match=match):
        mixer.reduce_(plan)
    assert mixer.state_size == 8


def test_one_keep_set_for_every_group_is_accepted():
    model = tiny_model((8,), n_groups=2)
    keep = torch.tensor([0, 3, 5])
    reference = _zero_dropped_channels(tiny_model((8,), n_groups=2), 0, keep.expand(2, -1))
    plan = ReductionPlan(
        n=8, rank=3, hsv=torch.ones(8), energy_kept=1.0, error_bound=0.0, rule="modal", keep=keep
    )
    model.mixers()[0].reduce_(plan)
    torch.testing.assert_close(logits(model, ids()), logits(reference, ids()), atol=1e-5, rtol=1e-5)
