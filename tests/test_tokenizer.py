"""The byte-level tokenizer: the training data's ids exactly, saved with every LM, loadable everywhere."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from isolated_python import run_script
from transformers import AutoTokenizer, pipeline

import compressm_hf  # noqa: F401  (registers the Auto classes)
from compressm_hf.cli.train import ModelArguments, build_model
from compressm_hf.data import byte_lm_splits
from compressm_hf.modeling import CompreSSMByteTokenizer

TEXT = "To be, or not to be: that is the question.\n  Ünïcödé ☃ 𝄞 — tabs\tand ' , . spaces  "


def _saved_byte_lm(folder, architecture: str):
    """The model ``compressm-train`` builds (tiny), saved with the tokenizer the CLI saves beside it."""
    torch.manual_seed(0)
    args = ModelArguments(architecture=architecture, hidden_size=16, num_hidden_layers=2, state_size=4)
    model = build_model(args).eval()
    model.save_pretrained(folder)
    CompreSSMByteTokenizer.for_model_config(model.config).save_pretrained(folder)
    return model


def test_ids_are_the_training_data_bytes_and_decode_back():
    tok = CompreSSMByteTokenizer()
    ids = tok(TEXT)["input_ids"]
    splits = byte_lm_splits(TEXT * 4, block_size=len(TEXT.encode("utf-8")), validation_fraction=0.25)
    assert ids == splits["train"][0]["input_ids"] == list(np.frombuffer(TEXT.encode("utf-8"), np.uint8))
    assert tok.decode(ids) == TEXT  # no space clean-up, no added token
    assert tok.decode_bytes(list(range(256))) == bytes(range(256))  # every byte, exactly
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not dropped silently
    assert len(tok) == tok.vocab_size == 256 and tok.all_special_tokens == []  # none unless the model has one


def test_special_tokens_come_from_the_model_config():
    mamba = build_model(
        ModelArguments(architecture="mamba", hidden_size=8, num_hidden_layers=1, state_size=2)
    )
    tok = CompreSSMByteTokenizer.for_model_config(mamba.config)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 0) and len(tok) == 256
    text = "a\x00b"  # the NUL byte is both a byte and the special token: one id either way
    assert tok(text)["input_ids"] == [97, 0, 98] and tok.decode([97, 0, 98]) == text
    assert tok.decode([97, 0, 98], skip_special_tokens=True) == "ab"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[97, 98, 0, 0], [97, 98, 99, 100]]
    lru = build_model(ModelArguments(architecture="lru", hidden_size=8, num_hidden_layers=1, state_size=2))
    assert CompreSSMByteTokenizer.for_model_config(lru.config).all_special_tokens == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CompreSSMByteTokenizer(eos_token="</s>"), "eos_token='</s>' is not a byte"),
        (lambda: CompreSSMByteTokenizer(pad_token="☃"), "pad_token='☃' is not a byte"),
        (
            lambda: CompreSSMByteTokenizer.for_model_config(SimpleNamespace(vocab_size=100)),
            "vocab_size=100",
        ),
        (
            lambda: CompreSSMByteTokenizer.for_model_config(
                SimpleNamespace(vocab_size=256, eos_token_id=300)
            ),
            "config.eos_token_id=300 is not a byte id",
        ),
    ],
)
def test_bad_special_tokens_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_saved_folder_loads_with_auto_tokenizer_and_pipeline(tmp_path):
    folder = tmp_path / "tiny-mamba"
    model = _saved_byte_lm(folder, "mamba")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CompreSSMByteTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_bytes.CompreSSMByteTokenizer"
    assert (folder / "tokenization_bytes.py").is_file()  # the code, for trust_remote_code
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok) is CompreSSMByteTokenizer and tok.eos_token_id == 0
    assert tok(TEXT)["input_ids"] == list(TEXT.encode("utf-8"))

    generator = pipeline("text-generation", model=str(folder))
    out = generator("To be", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = tok("To be", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out == tok.decode(expected[0], skip_special_tokens=True)


def test_trust_remote_code_tokenizer_without_compressm_hf(tmp_path):
    folder = tmp_path / "tiny-lru"
    _saved_byte_lm(folder, "lru")
    script = tmp_path / "load_tokenizer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, sys
            assert importlib.util.find_spec("compressm_hf") is None, "compressm_hf is importable"
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(tok).__module__.startswith("transformers_modules."), type(tok).__module__
            text = {TEXT!r}
            ids = tok(text)["input_ids"]
            assert ids == list(text.encode("utf-8")), ids
            assert tok.decode(ids) == text
            assert "compressm_hf" not in sys.modules
            print("OK", len(tok))
            """
        )
    )
    proc = run_script(script, compressm_hf=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 256" in proc.stdout


def test_compressm_train_saves_the_tokenizer(tmp_path):
    from compressm_hf.cli.train import main

    data = tmp_path / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 40, "utf-8")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--dataset", str(data), "--no_compression", "--disable_tqdm", "true"]
    argv += ["--hidden_size", "8", "--num_hidden_layers", "1", "--state_size", "4", "--block_size", "16"]
    argv += ["--per_device_train_batch_size", "2", "--max_steps", "1", "--eval_strategy", "no"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok) is CompreSSMByteTokenizer and tok.eos_token_id == 0
    assert "raw UTF-8 bytes" in (out / "README.md").read_text()
