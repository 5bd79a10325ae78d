"""The paper's LRU block as an `LRUConfig`: BatchNorm, optional final norm, fan-in uniform init, the preset."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification

import compressm_hf.modeling  # noqa: F401  (registers the Auto classes)
from compressm_hf.modeling.lru import (
    LRUConfig,
    LRUForCausalLM,
    LRUForSequenceClassification,
    LRUModel,
)
from compressm_hf.modeling.lru.modeling_lru import LRUBatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fresh-process helper
from isolated_python import run_script


def _paper(**overrides) -> LRUConfig:
    fields = dict(hidden_size=6, state_size=10, num_labels=3, batch_norm_momentum=0.3)
    return LRUConfig.paper_sequence_classification(**{**fields, **overrides})


def _trained_classifier(steps: int = 3, seed: int = 0) -> LRUForSequenceClassification:
    """A small paper-block classifier after a few AdamW steps (BatchNorm running statistics moved)."""
    torch.manual_seed(seed)
    model = LRUForSequenceClassification(_paper())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = torch.randn(4, 7, 1) * 3 + 2, torch.randint(0, 3, (4,))
        model(inputs_embeds=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ------------------------------------------------------------------------------------------ config


def test_preset_is_the_official_block():
    config = LRUConfig.paper_sequence_classification()
    assert (config.num_hidden_layers, config.hidden_size, config.state_size) == (1, 8, 256)
    assert (config.norm_type, config.final_norm, config.initializer) == ("batchnorm", False, "fan_in_uniform")
    assert (config.r_min, config.r_max, config.max_phase) == (0.9, 0.999, 6.28)
    assert (config.input_size, config.num_labels, config.hidden_dropout) == (1, 10, 0.1)
    assert config.batch_norm_momentum == 0.01 and config.classifier_pooling == "mean"
    assert config.state_sizes == [256]
    custom = LRUConfig.paper_sequence_classification(hidden_size=32, state_size=64, num_labels=4)
    assert (custom.hidden_size, custom.state_sizes, custom.num_labels) == (32, [64], 4)
    assert custom.norm_type == "batchnorm"
    # the language-modelling defaults are unchanged
    default = LRUConfig()
    assert (default.norm_type, default.final_norm, default.initializer) == ("layernorm", True, "normal")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("norm_type", "groupnorm", "norm_type"),
        ("batch_norm_momentum", 0.0, "batch_norm_momentum"),
        ("batch_norm_momentum", 1.5, "batch_norm_momentum"),
        ("initializer", "xavier", "initializer"),
    ],
)
def test_bad_fields_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        LRUConfig(**{field: value})


def test_final_norm_must_be_a_bool():
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match="final_norm"):
        LRUConfig(final_norm="yes")


# --------------------------------------------------------------------------------------- batchnorm


def test_batchnorm_training_statistics_span_batch_and_time_and_eval_uses_running_ones():
    torch.manual_seed(0)
    norm = LRUBatchNorm(3, eps=1e-5, momentum=0.5)
    x = torch.randn(4, 9, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 7.0])
    y = norm.train()(x)
    flat = y.reshape(-1, 3)
    torch.testing.assert_close(flat.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    rows = x.reshape(-1, 3)
    torch.testing.assert_close(norm.running_mean, 0.5 * rows.mean(0))
    torch.testing.assert_close(norm.running_var, 0.5 + 0.5 * rows.var(0, unbiased=True))
    assert int(norm.num_batches_tracked) == 1
    assert not any(True for _ in norm.parameters())  # no affine
    # eval: running statistics, position by position (an example's output does not depend on the others)
    norm.eval()
    alone = norm(x[:1])
    torch.testing.assert_close(norm(x)[:1], alone)
    expected = (x[:1] - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5)
    torch.testing.assert_close(alone, expected)


def test_batchnorm_statistics_skip_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 2)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    padded = x.clone()
    padded[mask == 0] = 1e3  # whatever the padding holds must not matter
    norm, ref = LRUBatchNorm(2, momentum=1.0).train(), LRUBatchNorm(2, momentum=1.0).train()
    y = norm(padded, mask)
    real = x[mask.bool()]
    torch.testing.assert_close(y[mask.bool()], ref(real[None])[0])
    assert torch.equal(y[mask == 0], torch.zeros_like(y[mask == 0]))
    torch.testing.assert_close(norm.running_mean, real.mean(0))


def test_batchnorm_refuses_a_training_batch_with_one_real_position():
    norm = LRUBatchNorm(2).train()
    with pytest.raises(ValueError, match="at least 2 real positions"):
        norm(torch.randn(1, 1, 2))


def test_batchnorm_is_refused_for_causal_lm_and_for_a_training_cache():
    with pytest.raises(ValueError, match="LRUForCausalLM cannot use config.norm_type='batchnorm'"):
        LRUForCausalLM(LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4, norm_type="batchnorm"))
    model = LRUModel(LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4, norm_type="batchnorm"))
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="training mode with config.norm_type='batchnorm'"):
        model.train()(ids, use_cache=True)


def test_batchnorm_model_decodes_through_its_cache_in_eval():
    torch.manual_seed(0)
    model = LRUModel(LRUConfig(hidden_size=8, num_hidden_layers=2, state_size=4, norm_type="batchnorm"))
    model.train()(torch.randint(0, 256, (4, 9)))  # move the running statistics away from (0, 1)
    model.eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        full = model(ids).last_hidden_state
        out = model(ids[:, :3], use_cache=True)
        steps = [out.last_hidden_state]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(3, 6):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_final_norm_is_optional():
    with_norm = LRUModel(LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4))
    without = LRUModel(LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4, final_norm=False))
    assert any(k.startswith("norm_f.") for k in with_norm.state_dict())
    assert not any(k.startswith("norm_f.") for k in without.state_dict())
    x = torch.randn(2, 5, 8)
    out = without(inputs_embeds=x, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])


# -------------------------------------------------------------------------------------------- init


def test_fan_in_uniform_init_of_linear_and_embedding_layers():
    torch.manual_seed(0)
    model = LRUForSequenceClassification(
        _paper(hidden_size=64, input_size=None, vocab_size=300, num_labels=50)
    )
    glu = model.model.layers[0].glu.in_proj
    bound = 1 / math.sqrt(64)
    for weight in (glu.weight, glu.bias, model.classifier.weight, model.classifier.bias):
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.8 * bound  # uniform over the whole interval, biases too
    assert abs(glu.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert abs(model.model.embeddings.weight.std().item() - 1.0) < 0.05
    normal = LRUForSequenceClassification(LRUConfig(hidden_size=64, num_hidden_layers=1, state_size=4))
    assert torch.equal(normal.classifier.bias, torch.zeros_like(normal.classifier.bias))
    assert abs(normal.classifier.weight.std().item() - 0.02) < 0.005


# ------------------------------------------------------------------------------ save / load / reduce


def test_save_load_keeps_batchnorm_running_statistics(tmp_path):
    model = _trained_classifier()
    norm = model.model.layers[0].norm
    assert int(norm.num_batches_tracked) == 3 and norm.running_mean.abs().max() > 0.1
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(again) is LRUForSequenceClassification
    assert again.config.norm_type == "batchnorm" and again.config.final_norm is False
    loaded = again.model.layers[0].norm
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(loaded, name), getattr(norm, name)), name
    x = torch.randn(3, 7, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            again(inputs_embeds=x).logits, model(inputs_embeds=x).logits, rtol=0, atol=0
        )


class _Signals(Dataset):
    """Two classes of 1-channel sequences (a constant level of +-1 plus noise), 8 steps."""

    def __init__(self, size: int = 64):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 2, (size,), generator=g)
        self.x = (2.0 * self.labels - 1)[:, None, None] + 0.5 * torch.randn(size, 8, 1, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"inputs_embeds": self.x[i], "labels": self.labels[i]}


def test_callback_reduces_a_batchnorm_model_and_the_result_round_trips(tmp_path):
    from transformers import Trainer, TrainingArguments

    from compressm_hf.trainer import CompreSSMCallback

    torch.manual_seed(0)
    model = LRUForSequenceClassification(_paper(hidden_size=4, state_size=16, num_labels=2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    callback = CompreSSMCallback(tau=0.3, steps=[2, 4])
    Trainer(model=model, args=args, train_dataset=_Signals(), callbacks=[callback]).train()
    mixer, norm = model.model.layers[0].mixer, model.model.layers[0].norm
    assert model.config.state_sizes == [mixer.state_size] and mixer.state_size < 16
    # the norm acts on the hidden stream: its buffers keep their size and kept updating through the cuts
    assert norm.running_mean.shape == norm.running_var.shape == (4,)
    assert int(norm.num_batches_tracked) == 6

    out = tmp_path / "saved"
    model.save_pretrained(out)
    x = _Signals(6).x
    model.eval()
    with torch.no_grad():
        ref = model(inputs_embeds=x).logits
        assert torch.isfinite(ref).all()
        again = LRUForSequenceClassification.from_pretrained(out).eval()
        assert again.config.state_sizes == model.config.state_sizes
        torch.testing.assert_close(again(inputs_embeds=x).logits, ref, rtol=0, atol=0)
        # a model built at the original size takes the reduced state dict (resize_) with the running stats
        original = LRUForSequenceClassification(_paper(hidden_size=4, state_size=16, num_labels=2)).eval()
        original.load_state_dict(model.state_dict())
        assert original.model.layers[0].mixer.state_size == mixer.state_size
        torch.testing.assert_close(original(inputs_embeds=x).logits, ref, rtol=0, atol=0)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        import compressm_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("compressm_hf should not be importable here")
    folder, x_path, out_path = sys.argv[1:4]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    assert type(model.model.layers[0].norm).__name__ == "LRUBatchNorm"
    with torch.no_grad():
        logits = model(inputs_embeds=torch.load(x_path)).logits
    torch.save({"logits": logits, "running_mean": model.model.layers[0].norm.running_mean}, out_path)
    """
)


def test_trust_remote_code_loads_the_paper_block_without_compressm_hf(tmp_path):
    model = _trained_classifier()
    folder = tmp_path / "paper-block"
    model.save_pretrained(folder)
    x = torch.randn(3, 7, 1)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "remote.py"
    script.write_text(_REMOTE_SCRIPT)
    result = run_script(
        script, compressm_hf=False, args=(str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["running_mean"], model.model.layers[0].norm.running_mean)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(inputs_embeds=x).logits, rtol=0, atol=0)
