"""Every mixer implements the whole ``ReducibleSSM`` protocol (``resize_`` included) with its signatures, and the
modeling files validate ``plan.keep`` with one function (``modeling_common._checked_keep``)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from compressm_hf import ReducibleSSM, ReductionPlan, find_reducible_layers
from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM
from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM
from compressm_hf.modeling.mamba.modeling_common import _checked_keep
from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

PROTOCOL_METHODS = ("lti_system", "reduce_", "resize_")


def _toy_model():
    """The toy SSM of the trainer tests (loaded by path: ``tests/trainer`` is a package of its own)."""
    path = Path(__file__).parent / "trainer" / "toy_ssm.py"
    spec = importlib.util.spec_from_file_location("toy_ssm_for_protocol_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ToySSMForCausalLM(module.ToySSMConfig(state_sizes=(4, 3)))


def _models():
    return {
        "lru": LRUForCausalLM(LRUConfig(hidden_size=8, num_hidden_layers=2, state_sizes=[4, 3])),
        "mamba": CompreSSMMambaForCausalLM(
            CompreSSMMambaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_sizes=[4, 3])
        ),
        "mamba2": CompreSSMMamba2ForCausalLM(
            CompreSSMMamba2Config(
                vocab_size=32,
                hidden_size=8,
                num_heads=2,
                head_dim=8,
                n_groups=1,
                num_hidden_layers=2,
                state_sizes=[4, 3],
            )
        ),
        "toy": _toy_model(),
    }


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.mark.parametrize("name", ["lru", "mamba", "mamba2", "toy"])
def test_every_mixer_satisfies_the_protocol_with_its_signatures(models, name):
    layers = find_reducible_layers(models[name])
    assert [layer.layer_idx for layer in layers] == [0, 1]
    for layer in layers:
        assert isinstance(layer, ReducibleSSM), type(layer).__name__
        for method in PROTOCOL_METHODS:
            expected = list(inspect.signature(getattr(ReducibleSSM, method)).parameters)[1:]
            found = list(inspect.signature(getattr(layer, method)).parameters)
            assert found == expected, (
                f"{type(layer).__name__}.{method}{found} != ReducibleSSM.{method}{expected}"
            )


@pytest.mark.parametrize("name", ["lru", "mamba", "mamba2"])
def test_resize_changes_the_layer_and_the_config(models, name):
    model = models[name]
    layer = find_reducible_layers(model)[1]
    assert layer.resize_(5) is None
    assert layer.state_size == 5 and model.config.state_sizes[1] == 5
    layer.resize_(3)
    assert layer.state_size == 3 and model.config.state_sizes == [4, 3]
    with pytest.raises(ValueError, match="state_size must be >= 1"):
        layer.resize_(0)


def test_protocol_requires_resize():
    class WithoutResize(torch.nn.Module):
        layer_idx, state_size = 0, 2

        def lti_system(self): ...

        def reduce_(self, plan): ...

    class WithResize(WithoutResize):
        def resize_(self, state_size): ...

    assert not isinstance(WithoutResize(), ReducibleSSM)
    assert isinstance(WithResize(), ReducibleSSM)


# ---------------------------------------------------------------------------------------------- plan.keep


def test_checked_keep_returns_a_new_cpu_int64_tensor():
    keep = torch.tensor([3, 0], dtype=torch.int32)
    out = _checked_keep(keep, n=4, rank=2, where="layer 0")
    assert out.dtype == torch.int64 and out.tolist() == [3, 0] and out.data_ptr() != keep.data_ptr()
    grouped = _checked_keep([1, 2], n=4, rank=2, where="layer 0", groups=3)
    assert grouped.shape == (3, 2) and grouped.tolist() == [[1, 2]] * 3
    assert _checked_keep([[0, 1], [3, 2]], n=4, rank=2, where="layer 0", groups=2).tolist() == [
        [0, 1],
        [3, 2],
    ]


@pytest.mark.parametrize(
    ("keep", "rank", "groups", "match"),
    [
        ([0, 1, 2], 2, None, r"shape \(3,\) but needs \(2,\)"),
        ([0, 1], 5, None, r"1 <= rank <= n=4"),
        ([0, 0], 2, None, r"plan.keep=\[0, 0\] must hold 2 distinct indices in \[0, 4\)\."),
        ([0, 4], 2, None, r"distinct indices in \[0, 4\)"),
        ([-1, 2], 2, None, r"distinct indices in \[0, 4\)"),
        ([[0, 1], [2, 2]], 2, 2, r"distinct indices in \[0, 4\) per group"),
        ([[0, 1]], 2, 2, r"shape \(1, 2\) but needs \(2, 2\)"),
    ],
)
def test_checked_keep_names_the_layer_and_the_bad_value(keep, rank, groups, match):
    with pytest.raises(ValueError, match=match) as caught:
        _checked_keep(keep, n=4, rank=rank, where="Test layer 7", groups=groups)
    assert str(caught.value).startswith("Test layer 7: ")


@pytest.mark.parametrize("name", ["lru", "mamba", "mamba2"])
def test_every_model_refuses_a_bad_keep_with_the_one_message(name):
    model = _models()[name]
    layer = find_reducible_layers(model)[0]
    rule = "balanced" if name == "lru" else "modal"
    plan = ReductionPlan(
        n=4, rank=2, hsv=torch.ones(4), energy_kept=1.0, error_bound=0.0, rule=rule, keep=torch.tensor([1, 1])
    )
    with pytest.raises(ValueError, match=r"plan.keep=.* must hold 2 distinct indices in \[0, 4\)"):
        layer.reduce_(plan)
    assert layer.state_size == 4
