"""Perplexity from per-token negative log-likelihoods, as an offline ``evaluate`` metric module.

Unlike the Hub's ``perplexity`` (which loads a model by name), this takes the token losses the
Trainer already computed: ``exp(mean(nll))`` in nats, plus bits per byte/token.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Perplexity exp(mean NLL) and bits per token from per-token negative log-likelihoods (nats)."
_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): per-token negative log-likelihoods in nats.
Returns:
    perplexity (`float`), mean_nll (`float`), bits_per_token (`float`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64")}),
        )

    def _compute(self, nll):
        nll = np.asarray(nll, dtype=np.float64)
        if nll.size == 0:
            raise ValueError("perplexity needs at least one token loss; got an empty list.")
        if not np.all(np.isfinite(nll)):
            raise ValueError("perplexity got a non-finite token loss (NaN or Inf).")
        mean = float(nll.mean())
        return {"perplexity": math.exp(mean), "mean_nll": mean, "bits_per_token": mean / math.log(2)}
