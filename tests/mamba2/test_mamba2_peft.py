"""peft / LoRA on CompreSSM Mamba-2: the projections train, conv1d (read by the kernel) is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from compressm_hf import ReductionPlan
from compressm_hf.modeling.mamba2 import export_to_mamba2
from compressm_hf.modeling.mamba2.modeling_common import UnsupportedAdapterError

from .helpers import ids, tiny_model


def lora(model, targets, r=2):
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config)  # random lora_B, so that lora_A's gradient is nonzero


def test_lora_gradients_reach_every_adapter():
    targets = ["in_proj", "out_proj", "embeddings"]
    model = lora(tiny_model(), targets).train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_embedding_A" in n}
    assert all(any(t in n for n in lora_a) for t in targets)
    assert [n for n, p in lora_a.items() if p.grad is None or p.grad.abs().sum() == 0] == []
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer")
def test_lora_on_conv1d_is_refused_with_the_targets_that_train():
    # r divisible by groups (= conv channels = 32 + 2 * 2 * 8): peft accepts the depthwise conv, our mixer refuses it
    with pytest.raises(UnsupportedAdapterError, match=r"conv1d.*silently ignored.*in_proj, out_proj"):
        lora(tiny_model((8,)), ["conv1d"], r=64)


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


def test_reduce_and_export_refuse_adapters_until_merged(tmp_path):
    model = lora(tiny_model((8,)), ["in_proj"])
    mixer = model.base_model.model.mixers()[0]
    plan = ReductionPlan(
        n=8,
        rank=3,
        hsv=torch.ones(8),
        energy_kept=1.0,
        error_bound=0.0,
        rule="modal",
        keep=torch.tensor([0, 1, 2]),
    )
    with pytest.raises(UnsupportedAdapterError, match="in_proj"):
        mixer.reduce_(plan)
    assert mixer.state_size == 8  # nothing changed
    with pytest.raises(UnsupportedAdapterError, match="merge"):
        export_to_mamba2(model.base_model.model, tmp_path)
    merged = model.merge_and_unload()
    merged.mixers()[0].reduce_(plan)
    assert merged.config.state_sizes == [3]
