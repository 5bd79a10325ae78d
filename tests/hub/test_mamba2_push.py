"""A Mamba-2 LM trained and cut by CompreSSMCallback, pushed by Trainer.push_to_hub through the fake Hub.

``CompreSSMHubCallback`` writes the CompreSSM card (Mamba-2, the report, the sizes); the uploaded folder loads
back with ``AutoModelForCausalLM.from_pretrained`` at the compressed per-layer state sizes with the trained
model's logits, and no uploaded file of any commit holds the token.
"""

from __future__ import annotations

import torch
from hub_test_utils import GOOD_TOKEN, TinyTokens, logits_of
from huggingface_hub import ModelCard
from test_secrets import (
    _all_commits,
    _grep,
    _restore_hf_token,  # noqa: F401 (autouse: HF_TOKEN is put back after the test)
)

from compressm_hf import CompreSSMCallback
from compressm_hf.trainer import read_report
from compressm_hf.trainer.hub import CompreSSMHubCallback

REPO, STATE = "user/mamba2-cut", 8


def _mamba2():
    """Hidden 16 (4 heads of 8), 2 groups, d_state 8 in both layers; vocabulary 32 (``TinyTokens``)."""
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

    torch.manual_seed(0)
    config = CompreSSMMamba2Config(
        vocab_size=32,
        hidden_size=16,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        num_hidden_layers=2,
        state_sizes=[STATE, STATE],
        chunk_size=4,
        eos_token_id=None,
    )
    return CompreSSMMamba2ForCausalLM(config)


def _layer_sizes(model) -> list[int]:
    return [int(layer.mixer.ssm_state_size) for layer in model.backbone.layers]


def test_trained_and_cut_mamba2_pushes_and_loads_back_at_its_compressed_sizes(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    out = tmp_path / "out"
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        push_to_hub=True,
        hub_model_id=REPO,
        hub_strategy="end",
        hub_token=GOOD_TOKEN,
    )
    compress = CompreSSMCallback(tau=0.3, steps=[3], statistics_steps=2)
    trainer = Trainer(model=_mamba2(), args=args, train_dataset=TinyTokens(), callbacks=[compress])
    CompreSSMHubCallback.attach(trainer, dataset_names=["synthetic"], license="apache-2.0")
    trainer.train()
    model = trainer.model.eval()
    sizes = list(model.config.state_sizes)
    assert sizes == _layer_sizes(model) and all(n < STATE for n in sizes), sizes
    trainer.push_to_hub()

    files = fake_hub.files(REPO)
    for name in ("README.md", "compression_report.json", "config.json", "model.safetensors"):
        assert name in files, name
    assert "modeling_compressm_mamba2.py" in files  # the code travels with the weights
    assert _grep(_all_commits(fake_hub, REPO), [GOOD_TOKEN]) == []

    # the card names the architecture, the report and the compressed sizes
    card = ModelCard(files["README.md"].decode())
    assert {"mamba2", "compressed"} <= set(card.data.tags)
    assert card.data.compressm["original_state_sizes"] == [STATE, STATE]
    assert card.data.compressm["final_state_sizes"] == sizes
    assert "A Mamba-2 model" in card.text and "(compression_report.json)" in card.text
    assert "not a bound for the kept subset of state channels" in card.text
    # the uploaded report is the callback's, with the Mamba-2 entries
    (tmp_path / "pulled").mkdir()
    (tmp_path / "pulled" / "compression_report.json").write_bytes(files["compression_report.json"])
    report = read_report(tmp_path / "pulled")
    assert report["final_sizes"] == sizes
    assert all(
        layer["extra"]["error_bound_applies"] is False
        for event in report["events"]
        for layer in event["layers"]
        if layer["reduced"]
    )

    # the Hub copy loads at the compressed per-layer sizes (in this process transformers picks the class
    # compressm_hf registered; tests/mamba2 loads the copied code in a Python without compressm_hf)
    loaded = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True, token=GOOD_TOKEN).eval()
    assert type(loaded).__name__ == "CompreSSMMamba2ForCausalLM"
    assert loaded.config.state_sizes == sizes and _layer_sizes(loaded) == sizes
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=1e-5)
