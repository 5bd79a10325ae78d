"""Multi-query associative recall (MQAR), generated offline from a seed.

MQAR is the synthetic recall task of the Zoology benchmark (Arora et al., arXiv 2312.04927), used by the
Based and Mamba-2 papers because a recurrent model's recall accuracy grows with its state size. Each
sequence of ``seq_len`` tokens is

* a context of ``num_kv_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...`` (the first ``2 * num_kv_pairs``
  tokens). Keys are distinct tokens of ``[1, vocab_size // 2)``, values distinct tokens of
  ``[vocab_size // 2, vocab_size)`` (token 0 is never a key: Zoology's convention);
* then ``num_queries`` queries ``k v`` at even offsets of the remaining tokens: a key of the context
  (each queried key distinct) followed by the value bound to it. The gaps follow Zoology's power law
  ``p(g) ~ g^(power_a - 1)`` (``power_a = 0.01``: most queries come soon after the context,
  ``power_a = 1``: uniform);
* every other position is filler: uniform random tokens of ``[0, vocab_size)`` (Zoology's
  ``random_non_queries``), or 0 with ``random_filler=False``.

``labels`` follow the transformers causal-LM convention (same length as ``input_ids``, the model shifts
them): ``labels[t] = input_ids[t]`` at the answer (value) position of every query and ``-100`` everywhere
else, so the loss and the accuracy count only the recalled values. Unlike Zoology, which leaves the answer
out of the inputs, the value follows its query key in ``input_ids`` too, so one sequence is an ordinary LM
example.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "mqar_arrays", "mqar_dataset", "mqar_splits", "recall_accuracy"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def mqar_arrays(
    num_examples: int,
    *,
    vocab_size: int = 128,
    num_kv_pairs: int = 8,
    seq_len: int = 64,
    num_queries: int | None = None,
    power_a: float = 0.01,
    random_filler: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """MQAR sequences as numpy arrays.

    Args:
        num_examples: number of sequences (>= 1).
        vocab_size: tokens ``[0, vocab_size)``; keys from ``[1, vocab_size // 2)``, values from
            ``[vocab_size // 2, vocab_size)``. Needs ``vocab_size // 2 - 1 >= num_kv_pairs``.
        num_kv_pairs: key-value pairs in the context (>= 1).
        seq_len: tokens per sequence; needs ``seq_len >= 2 * num_kv_pairs + 2 * num_queries``.
        num_queries: queried keys per sequence, ``1 <= num_queries <= num_kv_pairs``; default
            ``num_kv_pairs`` (every key is queried once, as in Zoology).
        power_a: exponent of the gap distribution, ``0 < power_a <= 1``.
        random_filler: fill the non-query positions with random tokens (True) or with 0.
        seed: the whole output is a function of the arguments: the same seed gives the same arrays.

    Returns:
        ``{"input_ids": int64 (num_examples, seq_len), "labels": int64 (num_examples, seq_len)}``;
        ``labels`` is ``-100`` except at the ``num_queries`` answer positions of each row.

    Raises:
        ValueError: an argument outside the ranges above (the message names it and what is allowed).
    """
    num_examples = _check_int("num_examples", num_examples, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 4)
    num_kv_pairs = _check_int("num_kv_pairs", num_kv_pairs, 1)
    seq_len = _check_int("seq_len", seq_len, 2)
    seed = _check_int("seed", seed, 0)
    num_queries = num_kv_pairs if num_queries is None else _check_int("num_queries", num_queries, 1)
    if num_queries > num_kv_pairs:
        raise ValueError(
            f"num_queries={num_queries} must be <= num_kv_pairs={num_kv_pairs} (keys are queried once)."
        )
    key_vocab = vocab_size // 2
    if num_kv_pairs > key_vocab - 1 or num_kv_pairs > vocab_size - key_vocab:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} needs that many distinct keys in [1, {key_vocab}) and values in "
            f"[{key_vocab}, {vocab_size}): use vocab_size >= {2 * num_kv_pairs + 2} or fewer pairs."
        )
    context = 2 * num_kv_pairs
    if seq_len < context + 2 * num_queries:
        raise ValueError(
            f"seq_len={seq_len} is too short for {num_kv_pairs} key-value pairs and {num_queries} queries: "
            f"it must be >= 2 * num_kv_pairs + 2 * num_queries = {context + 2 * num_queries}."
        )
    if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a must be a float in (0, 1], got {power_a!r}.")

    rng = np.random.default_rng(seed)
    n = num_examples
    # distinct keys and values per row: the first num_kv_pairs of a random permutation
    keys = 1 + rng.random((n, key_vocab - 1)).argsort(axis=1)[:, :num_kv_pairs]
    values = key_vocab + rng.random((n, vocab_size - key_vocab)).argsort(axis=1)[:, :num_kv_pairs]
    if random_filler:
        input_ids = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
    else:
        input_ids = np.zeros((n, seq_len), dtype=np.int64)
    input_ids[:, 0:context:2] = keys
    input_ids[:, 1:context:2] = values

    # query slots (pairs of tokens after the context), drawn without replacement with p(g) ~ g^(a-1):
    # the Gumbel top-k trick samples without replacement proportionally to p, vectorized over rows
    slots = (seq_len - context) // 2
    log_p = (power_a - 1.0) * np.log(np.arange(1, slots + 1, dtype=np.float64))
    gumbel = -np.log(-np.log(rng.random((n, slots))))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :num_queries]
    which = rng.random((n, num_kv_pairs)).argsort(axis=1)[:, :num_queries]  # the queried pairs
    rows = np.arange(n)[:, None]
    key_pos = context + 2 * gaps
    input_ids[rows, key_pos] = keys[rows, which]
    input_ids[rows, key_pos + 1] = values[rows, which]
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[rows, key_pos + 1] = values[rows, which]
    return {"input_ids": input_ids.astype(np.int64), "labels": labels}


def mqar_dataset(num_examples: int, **kwargs):
    """MQAR as a :class:`datasets.Dataset` with ``input_ids`` and ``labels`` (int64, length ``seq_len``),
    ready for ``transformers.Trainer`` and any causal LM. ``kwargs`` are those of :func:`mqar_arrays`."""
    import datasets

    arrays = mqar_arrays(num_examples, **kwargs)
    seq_len = arrays["input_ids"].shape[1]
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int64"), length=seq_len),
            "labels": datasets.Sequence(datasets.Value("int64"), length=seq_len),
        }
    )
    return datasets.Dataset.from_dict(arrays, features=features)


def mqar_splits(num_train: int = 20_000, num_test: int = 1_000, *, seed: int = 0, **kwargs):
    """A ``DatasetDict`` with ``train`` and ``test`` MQAR splits drawn from two different seeds
    (``2 * seed`` and ``2 * seed + 1``), so the test sequences are new draws of the same task."""
    import datasets

    return datasets.DatasetDict(
        train=mqar_dataset(num_train, seed=2 * seed, **kwargs),
        test=mqar_dataset(num_test, seed=2 * seed + 1, **kwargs),
    )


def recall_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of query answers predicted exactly (argmax), transformers' causal shift applied.

    Args:
        logits: float array (batch, seq_len, vocab) of a causal LM on ``input_ids``.
        labels: int array (batch, seq_len), ``-100`` where nothing is asked.

    Raises:
        ValueError: the shapes do not match, or ``labels`` holds no answer position.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (batch, seq_len, vocab) and labels (batch, seq_len); got {logits.shape} and {labels.shape}."
        )
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    asked = target != IGNORE_INDEX
    if not asked.any():
        raise ValueError("labels hold no answer position (all -100): nothing to score.")
    return float((pred[asked] == target[asked]).mean())
