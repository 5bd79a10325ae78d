"""The reduction protocol on the LRU mixer: lti_system, reduce_ (balanced and modal), resize_ on load."""

from types import SimpleNamespace

import pytest
import torch

from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM, LRUMixer


def _lm(seed=0, dtype=torch.float64, **kwargs):
    defaults = dict(hidden_size=12, num_hidden_layers=2, state_size=6, scan_chunk_size=4)
    defaults.update(kwargs)
    torch.manual_seed(seed)
    return LRUForCausalLM(LRUConfig(**defaults)).to(dtype).eval()


def _plan(rank, n, keep=None, diagonal=None):
    """A ReductionPlan-like record (the mixer duck-types plans)."""
    return SimpleNamespace(n=n, rank=rank, keep=keep, diagonal=diagonal)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_lti_system_is_the_complex_layer_system():
    mixer = _lm().model.layers[0].mixer
    system = mixer.lti_system()
    assert system.diagonal is True and system.reduction == "balanced"
    assert system.A.dtype == system.B.dtype == system.C.dtype == torch.complex128
    assert system.A.shape == (6,) and system.B.shape == (6, 12) and system.C.shape == (12, 6)
    assert not system.A.requires_grad and not system.B.requires_grad
    lam = torch.exp(torch.complex(-torch.exp(mixer.nu_log), torch.exp(mixer.theta_log))).detach()
    torch.testing.assert_close(system.A, lam.to(torch.complex128))
    gamma = torch.exp(mixer.gamma_log).detach()[:, None]
    torch.testing.assert_close(system.B.real, (gamma * mixer.B_re).detach())
    torch.testing.assert_close(system.C.imag, mixer.C_im.detach())
    try:
        from compressm_hf.protocol import LTISystem
    except ImportError:  # pragma: no cover - the package is installed in the test environment
        pytest.skip("compressm_hf.protocol is not importable")
    assert isinstance(system, LTISystem)


def test_identity_balanced_plan_leaves_outputs_unchanged():
    model = _lm()
    ids = torch.randint(0, 256, (2, 11))
    before = _logits(model, ids)
    mixer = model.model.layers[0].mixer
    system = mixer.lti_system()
    old = dict(mixer.named_parameters())
    swaps = mixer.reduce_(_plan(6, 6, diagonal=SimpleNamespace(A=system.A, B=system.B, C=system.C)))
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-10, atol=1e-10)
    assert [s.state_dim for s in swaps] == [0, 0, 0, 0, 0, 1, 1]
    assert all(s.keep is None for s in swaps)
    for swap in swaps:
        assert swap.new is not swap.old and isinstance(swap.new, torch.nn.Parameter)
        assert swap.new.dtype == swap.old.dtype and swap.new.requires_grad
    assert {id(s.old) for s in swaps} == {
        id(old[n]) for n in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")
    }
    assert mixer.D is old["D"]  # the feedthrough is untouched


def test_full_rank_balanced_truncation_roundtrip_keeps_outputs():
    core = pytest.importorskip(
        "compressm_hf", reason="the compressm_hf core is needed for balanced_truncation"
    )
    if not hasattr(core, "balanced_truncation") or not hasattr(core, "rediagonalize"):
        pytest.skip("compressm_hf.balanced_truncation / rediagonalize are not available yet")
    model = _lm()
    ids = torch.randint(0, 256, (2, 11))
    before = _logits(model, ids)
    for layer in model.model.layers:
        mixer = layer.mixer
        system = mixer.lti_system()
        bt = core.balanced_truncation(system.A, system.B, system.C, rank=mixer.state_size)
        diag = core.rediagonalize(bt.A, bt.B, bt.C)
        mixer.reduce_(_plan(mixer.state_size, mixer.state_size, diagonal=diag))
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-6, atol=1e-6)


def test_balanced_cut_obeys_the_error_bound_and_shrinks():
    core = pytest.importorskip("compressm_hf", reason="the compressm_hf core is needed for plan_reduction")
    if not hasattr(core, "plan_reduction"):
        pytest.skip("compressm_hf.plan_reduction is not available yet")
    model = _lm(state_size=10)
    mixer = model.model.layers[0].mixer
    plan = core.plan_reduction(mixer.lti_system(), core.RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.5))
    assert plan is not None and plan.rank == 5
    u = torch.randn(1, 64, 12, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u) - u * mixer.D
        swaps = mixer.reduce_(plan)
        reduced = mixer(u) - u * mixer.D
    assert mixer.state_size == 5 and model.config.state_sizes == [5, 10]
    assert {tuple(s.new.shape) for s in swaps} == {(5,), (5, 12), (12, 5)}
    # ||y - y_r||_2 <= 2 * sum(discarded hsv) * ||u||_2 for the complex system; Re() only shrinks the error
    assert (full - reduced).norm() <= plan.error_bound * u.norm() * (1 + 1e-6)


def test_modal_keep_plan_slices_states_and_updates_config():
    model = _lm()
    mixer = model.model.layers[1].mixer
    keep = torch.tensor([0, 2, 5])
    old = {name: p.detach().clone() for name, p in mixer.named_parameters()}
    swaps = mixer.reduce_(_plan(3, 6, keep=keep))
    assert mixer.state_size == 3
    assert model.config.state_sizes == [6, 3]
    assert model.model.layers[0].mixer.config is model.config
    torch.testing.assert_close(mixer.nu_log.detach(), old["nu_log"][keep])
    torch.testing.assert_close(mixer.B_im.detach(), old["B_im"][keep])
    torch.testing.assert_close(mixer.C_re.detach(), old["C_re"][:, keep])
    assert all(torch.equal(s.keep, keep) for s in swaps)
    assert [tuple(s.new.shape) for s in swaps] == [(3,), (3,), (3,), (3, 12), (3, 12), (12, 3), (12, 3)]
    ids = torch.randint(0, 256, (1, 5))
    assert model(ids).logits.shape == (1, 5, 256)
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 7)


def test_bad_plans_are_refused():
    mixer = _lm().model.layers[0].mixer
    with pytest.raises(ValueError, match="neither"):
        mixer.reduce_(_plan(3, 6))
    with pytest.raises(ValueError, match=r"plan.rank must be in \[1, 6\], got 7"):
        mixer.reduce_(_plan(7, 6, keep=torch.arange(7)))
    with pytest.raises(ValueError, match="distinct indices"):
        mixer.reduce_(_plan(2, 6, keep=torch.tensor([1, 1])))
    unstable = SimpleNamespace(
        A=torch.full((2,), 1.5 + 0j), B=torch.ones(2, 12) + 0j, C=torch.ones(12, 2) + 0j
    )
    with pytest.raises(ValueError, match=r"\|lambda\| < 1"):
        mixer.reduce_(_plan(2, 6, diagonal=unstable))
    wrong = SimpleNamespace(A=torch.full((2,), 0.5 + 0j), B=torch.ones(3, 12) + 0j, C=torch.ones(12, 2) + 0j)
    with pytest.raises(ValueError, match=r"B \(2, 12\)"):
        mixer.reduce_(_plan(2, 6, diagonal=wrong))
    assert mixer.state_size == 6


def test_real_eigenvalue_phase_is_guarded():
    mixer = _lm().model.layers[0].mixer
    diag = SimpleNamespace(
        A=torch.tensor([0.5 + 0j, -0.5 + 0j], dtype=torch.complex128),
        B=torch.ones(2, 12, dtype=torch.complex128),
        C=torch.ones(12, 2, dtype=torch.complex128),
    )
    mixer.reduce_(_plan(2, 6, diagonal=diag))
    assert torch.isfinite(mixer.theta_log).all()
    torch.testing.assert_close(mixer.lti_system().A, diag.A, rtol=1e-6, atol=1e-6)


def test_load_state_dict_of_a_reduced_checkpoint_into_an_original_size_model():
    reduced = _lm(seed=1, dtype=torch.float32)
    reduced.model.layers[0].mixer.reduce_(_plan(2, 6, keep=torch.tensor([1, 4])))
    reduced.model.layers[1].mixer.reduce_(_plan(5, 6, keep=torch.arange(5)))
    state = reduced.state_dict()

    fresh = _lm(seed=2, dtype=torch.float32)
    assert fresh.config.state_sizes == [6, 6]
    fresh.load_state_dict(state)
    assert fresh.config.state_sizes == [2, 5]
    assert [layer.mixer.state_size for layer in fresh.model.layers] == [2, 5]
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(_logits(fresh, ids), _logits(reduced, ids))


def test_resize_reallocates_and_updates_config():
    model = _lm(dtype=torch.float32)
    mixer = model.model.layers[1].mixer
    mixer.resize_(3)
    assert mixer.state_size == 3 and mixer.C_im.shape == (12, 3) and model.config.state_sizes == [6, 3]
    assert mixer.nu_log.dtype == torch.float32 and torch.isfinite(mixer.nu_log).all()
    with pytest.raises(ValueError, match="state_size must be >= 1, got 0"):
        mixer.resize_(0)


def test_mixer_implements_the_protocol():
    core = pytest.importorskip("compressm_hf")
    model = _lm()
    layers = core.find_reducible_layers(model)
    assert [m.layer_idx for m in layers] == [0, 1]
    assert all(isinstance(m, LRUMixer) and isinstance(m, core.ReducibleSSM) for m in layers)
