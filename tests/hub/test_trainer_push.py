"""Trainer(push_to_hub=True, hub_strategy="end") through the fake Hub keeps the CompreSSM card, plots, report."""

from __future__ import annotations

import json

import torch
from hub_test_utils import GOOD_TOKEN, TinyTokens, logits_of, make_report, tiny_model, tree_hash
from huggingface_hub import ModelCard

from compressm_hf.trainer.hub import CompreSSMHubCallback


def test_trainer_push_to_hub_end(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    out = tmp_path / "out"
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        push_to_hub=True,
        hub_model_id="user/trained",
        hub_strategy="end",
        hub_token=GOOD_TOKEN,
    )
    model = tiny_model("tiny")
    trainer = Trainer(model=model, args=args, train_dataset=TinyTokens())
    assert "user/trained" in fake_hub.repos  # Trainer.__init__ created the repository
    CompreSSMHubCallback.attach(
        trainer, dataset_names=["synthetic"], model_type_tag="lru", license="apache-2.0"
    )
    trainer.train()
    assert fake_hub.files("user/trained") == {}  # hub_strategy="end": nothing pushed during training

    # what CompreSSMCallback writes into output_dir after its events
    out.mkdir(exist_ok=True)
    (out / "compression_report.json").write_text(json.dumps(make_report(report_py_format=True)))
    trainer.push_to_hub()

    files = fake_hub.files("user/trained")
    for name in ("README.md", "compression_report.json", "hsv_spectra.png", "state_sizes.png", "config.json"):
        assert name in files, name
    assert "model.safetensors" in files and "modeling_tiny_ssm.py" in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.tags[:4] == ["compressm", "state-space-model", "lru", "compressed"]
    assert "generated_from_trainer" in card.data.tags  # kept from the Trainer's draft
    assert card.data.datasets == ["synthetic"]
    assert card.data.compressm["final_state_sizes"] == [5, 4]
    assert "## Training details" in card.text and "### Training hyperparameters" in card.text
    assert "- learning_rate: 0.001" in card.text and "More information needed" not in card.text
    assert "| loss (last logged) |" in card.text
    assert 'from_pretrained("user/trained", trust_remote_code=True)' in card.text

    # the pushed repository loads back with the trained weights
    before = tree_hash(out)
    loaded = AutoModelForCausalLM.from_pretrained("user/trained", trust_remote_code=True, token=GOOD_TOKEN)
    torch.testing.assert_close(logits_of(loaded), logits_of(trainer.model.eval()), rtol=0, atol=1e-5)
    assert tree_hash(out) == before


def test_trainer_every_save_pushes_card_from_callback(fake_hub, tmp_path):
    """hub_strategy="every_save": Trainer uploads output_dir at each save; on_push_begin refreshes the card."""
    from transformers import Trainer, TrainingArguments

    out = tmp_path / "out"
    out.mkdir()
    (out / "compression_report.json").write_text(json.dumps(make_report(report_py_format=True)))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        push_to_hub=True,
        hub_model_id="user/every-save",
        hub_strategy="every_save",
        hub_token=GOOD_TOKEN,
    )
    trainer = Trainer(model=tiny_model("tiny"), args=args, train_dataset=TinyTokens())
    CompreSSMHubCallback.attach(trainer, model_type_tag="lru")
    trainer.train()
    trainer._finish_current_push()  # the checkpoint push runs in the background
    files = fake_hub.files("user/every-save")
    assert {"README.md", "compression_report.json", "state_sizes.png", "model.safetensors"} <= set(files)
    assert not any(p.startswith("checkpoint-") for p in files)
    card = ModelCard(files["README.md"].decode())
    assert "compressed" in card.data.tags and card.data.compressm["final_state_sizes"] == [5, 4]
