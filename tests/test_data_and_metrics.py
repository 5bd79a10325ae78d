"""Offline data loaders and the packaged `evaluate` metric modules."""

import math

import numpy as np
import pytest

from compressm_hf import data
from compressm_hf.metrics import AVAILABLE_METRICS, load_metric, metric_path


def test_shakespeare_is_the_real_corpus():
    text = data.shakespeare_text()
    assert len(text) > 5_000_000
    assert "To be, or not to be" in text


def test_byte_lm_splits_shapes_and_held_out_tail():
    text = "abcdefghij" * 100  # 1000 bytes
    splits = data.byte_lm_splits(text, block_size=16, validation_fraction=0.1)
    train, val = splits["train"], splits["validation"]
    assert len(train) == 900 // 16 and len(val) == 100 // 16
    ids = np.asarray(train[0]["input_ids"])
    assert ids.shape == (16,) and ids.max() < 256
    assert train[0]["input_ids"] == train[0]["labels"]
    # the validation split is cut from the tail of the text, after the training part
    assert bytes(val[0]["input_ids"]).decode() == text[900:916]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"block_size": 1}, "block_size"), ({"validation_fraction": 1.0}, "validation_fraction")],
)
def test_byte_lm_splits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.byte_lm_splits("x" * 100, **kwargs)


def test_load_text_from_file_and_bad_source(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    assert data.load_text(str(f)) == "hello world"
    with pytest.raises(data.DataUnavailableError, match="no-such-corpus"):
        data.load_text(str(tmp_path / "no-such-corpus"))


def test_mnist1d_offline():
    splits = data.mnist1d_splits(num_samples=500)
    x = np.asarray(splits["train"][0]["inputs_embeds"])
    assert x.shape == (40, 1)
    assert set(splits["train"]["labels"]) <= set(range(10))


def test_fashion_mnist_sequences():
    if not (data.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    splits = data.fashion_mnist_splits(max_train=64, max_test=32, pool=2)
    assert np.asarray(splits["train"][0]["inputs_embeds"]).shape == (196, 1)
    assert len(splits["test"]) == 32


def test_packaged_metrics_work_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {"accuracy", "perplexity"} <= set(AVAILABLE_METRICS)
    acc = load_metric("accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    assert acc["accuracy"] == pytest.approx(0.75)
    ppl = load_metric("perplexity").compute(nll=[math.log(4.0)] * 3)
    assert ppl["perplexity"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")
