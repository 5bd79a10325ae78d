"""Accuracy, as an offline ``evaluate`` metric module (same name and output as the Hub's ``accuracy``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to the references: (TP + TN) / N."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): if `False`, return the number of correct predictions.
    sample_weight (`list` of `float`, *optional*): per-sample weights.
Returns:
    accuracy (`float`): in [0, 1] (or a count when `normalize=False`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions has shape {predictions.shape} but references has {references.shape}."
            )
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
            total = float(np.sum(sample_weight))
        else:
            total = float(correct.size)
        score = float(correct.sum())
        return {"accuracy": score / total if normalize and total else score}
