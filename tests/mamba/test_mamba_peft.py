"""peft / LoRA on CompreSSM Mamba: which targets train, which are refused, compressing under LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from compressm_hf import ReductionPlan
from compressm_hf.modeling.mamba import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    UnsupportedAdapterError,
    export_to_mamba,
)

VOCAB = 64


def tiny_model(state_sizes=(8, 4), seed=0) -> CompreSSMMambaForCausalLM:
    torch.manual_seed(seed)
    cfg = CompreSSMMambaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=len(state_sizes), state_sizes=list(state_sizes)
    )
    return CompreSSMMambaForCausalLM(cfg)


def ids(batch=2, length=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def lora(model, targets, r=2, **kw):
    kw.setdefault("init_lora_weights", False)  # random lora_B: adapters change the output
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **kw))


def modal_plan(n, keep) -> ReductionPlan:
    keep = torch.as_tensor(keep, dtype=torch.long)
    return ReductionPlan(
        n=n, rank=len(keep), hsv=torch.ones(n), energy_kept=1.0, error_bound=0.0, rule="modal", keep=keep
    )


@pytest.mark.parametrize(
    "targets", [["in_proj", "embeddings"], ["x_proj", "dt_proj", "out_proj"]], ids=["in_proj+emb", "x+dt+out"]
)
def test_lora_gradients_reach_every_adapter(targets):
    model = lora(tiny_model(), targets)  # random lora_B, so that lora_A's gradient is nonzero
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_embedding_A" in n}
    assert lora_a and all(p.requires_grad for p in lora_a.values())
    no_grad = [n for n, p in lora_a.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    for target in targets:
        assert any(target in n for n in lora_a), target
    # only adapters train
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_dt_proj_lora_changes_the_output():
    base = tiny_model().eval()
    x = ids()
    with torch.no_grad():
        before = base(x).logits.clone()
    model = lora(base, ["dt_proj"]).eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, before)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, before)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer")
def test_lora_on_conv1d_is_refused():
    # r divisible by groups (= d_inner = 32): peft accepts the depthwise conv, our mixer refuses it
    with pytest.raises(UnsupportedAdapterError, match="conv1d") as err:
        lora(tiny_model(), ["conv1d"], r=32)
    assert isinstance(err.value, ValueError) and "in_proj" in str(err.value)


def test_conv1d_in_modules_to_save_trains():
    # peft's ModulesToSaveWrapper forwards `.weight` to the trainable copy, which the kernel then reads
    model = get_peft_model(
        tiny_model(), LoraConfig(r=2, target_modules=["in_proj"], modules_to_save=["conv1d"])
    )
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    copies = [p for n, p in model.named_parameters() if "conv1d.modules_to_save" in n]
    assert len(copies) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in copies)


def test_wrapping_conv1d_by_hand_is_refused_in_forward():
    model = tiny_model().eval()
    mixer = model.backbone.layers[0].mixer

    class Wrapper(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    with pytest.raises(UnsupportedAdapterError):
        mixer.conv1d = Wrapper(mixer.conv1d)
    mixer._modules["conv1d"] = Wrapper(mixer._modules["conv1d"])  # bypasses __setattr__
    with pytest.raises(UnsupportedAdapterError, match="conv1d"):
        model(ids())


def test_reduce_slices_x_proj_lora_consistently():
    x = ids()
    keeps = (torch.tensor([0, 3, 6]), torch.tensor([1, 2]))

    def reduce_all(m):
        layers = [blk.mixer for blk in m.backbone.layers]
        return [layer.reduce_(modal_plan(layer.state_size, k)) for layer, k in zip(layers, keeps)]

    peft_model = lora(tiny_model(), ["x_proj", "in_proj"]).eval()
    inner = peft_model.base_model.model
    swaps = reduce_all(inner)
    R = inner.config.time_step_rank
    xp = inner.backbone.layers[0].mixer.x_proj
    assert xp.base_layer.weight.shape == (R + 6, 32) and xp.lora_B["default"].weight.shape == (R + 6, 2)
    assert xp.out_features == xp.base_layer.out_features == xp.lora_B["default"].out_features == R + 6
    assert inner.config.state_sizes == [3, 2]
    kinds = [(s.state_dim, tuple(s.new.shape)) for s in swaps[0]]
    assert kinds == [(1, (32, 3)), (0, (R + 6, 32)), (0, (R + 6, 2))]
    assert swaps[0][2].new is xp.lora_B["default"].weight and swaps[0][2].new.requires_grad
    with torch.no_grad():
        reduced_then_merged = peft_model.merge_and_unload()(x).logits
    # reference: merge first, then reduce the plain model
    ref = lora(tiny_model(), ["x_proj", "in_proj"]).merge_and_unload().eval()
    reduce_all(ref)
    with torch.no_grad():
        torch.testing.assert_close(reduced_then_merged, ref(x).logits, atol=1e-5, rtol=1e-5)


def test_training_continues_after_reducing_under_lora():
    peft_model = lora(tiny_model(), ["x_proj"], init_lora_weights=True)
    inner = peft_model.base_model.model
    for blk in inner.backbone.layers:
        blk.mixer.reduce_(modal_plan(blk.mixer.state_size, torch.arange(2)))
    peft_model.train()
    x = ids()
    peft_model(input_ids=x, labels=x).loss.backward()
    lora_b = inner.backbone.layers[0].mixer.x_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.shape == lora_b.shape


def test_reduce_refuses_dora_on_x_proj_before_touching_anything():
    peft_model = lora(tiny_model(), ["x_proj"], use_dora=True)
    mixer = peft_model.base_model.model.backbone.layers[0].mixer
    before = {n: p for n, p in mixer.named_parameters()}
    with pytest.raises(UnsupportedAdapterError, match="x_proj"):
        mixer.reduce_(modal_plan(8, [0, 1]))
    with pytest.raises(UnsupportedAdapterError, match="x_proj"):
        mixer.resize_(2)
    assert {n: p for n, p in mixer.named_parameters()} == before
    assert mixer.state_size == 8 and peft_model.base_model.model.config.state_sizes == [8, 4]


def test_export_refuses_unmerged_adapters(tmp_path):
    peft_model = lora(tiny_model((4, 4)), ["in_proj"])
    with pytest.raises(UnsupportedAdapterError, match="merge"):
        export_to_mamba(peft_model.base_model.model, tmp_path)
