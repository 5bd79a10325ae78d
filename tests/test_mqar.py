"""The offline MQAR generator (`compressm_hf.data_mqar`): determinism, correctness of every label, bad input."""

import numpy as np
import pytest

from compressm_hf.data_mqar import IGNORE_INDEX, mqar_arrays, mqar_dataset, mqar_splits, recall_accuracy

KW = dict(vocab_size=64, num_kv_pairs=8, seq_len=48)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = mqar_arrays(50, seed=3, **KW), mqar_arrays(50, seed=3, **KW), mqar_arrays(50, seed=4, **KW)
    for k in ("input_ids", "labels"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("random_filler", [True, False])
@pytest.mark.parametrize("num_queries", [None, 3])
def test_every_label_is_the_value_bound_to_its_key_earlier(random_filler, num_queries):
    out = mqar_arrays(200, seed=1, num_queries=num_queries, random_filler=random_filler, **KW)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.shape == labels.shape == (200, 48) and ids.dtype == labels.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 64
    context = 2 * KW["num_kv_pairs"]
    for row, lab in zip(ids, labels):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == len(keys) and keys.min() >= 1 and keys.max() < 32
        assert len(set(values)) == len(values) and values.min() >= 32
        bound = dict(zip(keys.tolist(), values.tolist()))
        answers = np.flatnonzero(lab != IGNORE_INDEX)
        assert len(answers) == (num_queries or KW["num_kv_pairs"])
        assert answers.min() > context  # queries come after the context
        queried = row[answers - 1]
        assert len(set(queried.tolist())) == len(queried)  # each key asked at most once
        for t in answers:
            assert lab[t] == row[t] == bound[row[t - 1]]
        if not random_filler:
            fill = np.ones(len(row), bool)
            fill[:context], fill[answers], fill[answers - 1] = False, False, False
            assert (row[fill] == 0).all()


def test_power_law_puts_queries_early_and_uniform_spreads_them():
    kw = dict(vocab_size=64, num_kv_pairs=4, seq_len=200, num_queries=1)
    early = np.flatnonzero(mqar_arrays(400, seed=0, power_a=0.01, **kw)["labels"] != IGNORE_INDEX) % 200
    flat = np.flatnonzero(mqar_arrays(400, seed=0, power_a=1.0, **kw)["labels"] != IGNORE_INDEX) % 200
    assert np.median(early) < np.median(flat)


def test_dataset_and_splits():
    ds = mqar_dataset(10, seed=0, **KW)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 10
    assert len(ds[0]["input_ids"]) == 48
    splits = mqar_splits(12, 5, seed=2, **KW)
    assert len(splits["train"]) == 12 and len(splits["test"]) == 5
    assert splits["train"][0]["input_ids"] != splits["test"][0]["input_ids"]
    assert splits["train"]["input_ids"] == mqar_dataset(12, seed=4, **KW)["input_ids"]


def test_recall_accuracy_applies_the_causal_shift():
    out = mqar_arrays(4, seed=0, **KW)
    labels = out["labels"]
    perfect = np.zeros((4, 48, 64))
    rows, cols = np.nonzero(labels != IGNORE_INDEX)
    perfect[rows, cols - 1, labels[rows, cols]] = 1.0  # the logit at t - 1 predicts token t
    assert recall_accuracy(perfect, labels) == 1.0
    assert recall_accuracy(np.zeros((4, 48, 64)), labels) == 0.0  # argmax 0 is never a value
    with pytest.raises(ValueError, match="no answer"):
        recall_accuracy(perfect, np.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="logits must be"):
        recall_accuracy(perfect[0], labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0}, "num_examples"),
        ({"vocab_size": 2}, "vocab_size"),
        ({"num_kv_pairs": 0}, "num_kv_pairs"),
        ({"num_kv_pairs": 40, "seq_len": 200}, "distinct keys"),
        ({"seq_len": 30}, "seq_len=30 is too short"),
        ({"num_queries": 9}, "num_queries=9"),
        ({"num_queries": 0}, "num_queries"),
        ({"power_a": 0.0}, "power_a"),
        ({"power_a": 1.5}, "power_a"),
        ({"seed": -1}, "seed"),
        ({"num_kv_pairs": 2.5}, "num_kv_pairs"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"num_examples": 5, **KW, **kwargs}
    with pytest.raises(ValueError, match=match):
        mqar_arrays(**args)
