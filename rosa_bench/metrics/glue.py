"""The official GLUE metrics per task, on a 0..1 scale, as plain Python floats (they go into
JSON and TensorBoard)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from rosa_bench.errors import choices_error


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, predictions))}


def _accuracy_f1(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MRPC and QQP report F1 of the positive class (paraphrase / duplicate) too."""
    f1 = f1_score(labels, predictions, pos_label=1, zero_division=0)
    return _accuracy(predictions, labels) | {"f1": float(f1)}


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Undefined for constant predictions (early in training): counts as 0, like sklearn's
    Matthews for a constant classifier."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(predictions, labels)[0])
    return 0.0 if math.isnan(value) else value


def _correlations(predictions: np.ndarray, labels: np.ndarray, split: str | None = None) -> dict[str, float]:
    """Pearson and Spearman; NaN (with a warning) when a prediction is not finite, which means a
    diverged model, not a score of 0 (the trainer ranks NaN below every score)."""
    predictions, labels = predictions.astype(float), labels.astype(float)
    bad = int((~np.isfinite(predictions)).sum())
    if bad:
        where = f" on split {split!r}" if split else ""
        warnings.warn(f"STS-B{where}: {bad} of {predictions.size} predictions are NaN or infinite "
                      "(diverged model?); pearson, spearmanr and combined are reported as NaN", stacklevel=3)
        return dict.fromkeys(("pearson", "spearmanr", "combined"), math.nan)
    pearson = _correlation(pearsonr, predictions, labels)
    spearman = _correlation(spearmanr, predictions, labels)
    return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}


SCORERS: dict[str, Callable[..., dict[str, float]]] = {
    "cola": _matthews, "sst2": _accuracy, "mrpc": _accuracy_f1, "qqp": _accuracy_f1,
    "stsb": _correlations, "mnli": _accuracy, "qnli": _accuracy, "rte": _accuracy, "wnli": _accuracy,
}


def glue_metrics(task: str, predictions: Any, labels: Any, split: str | None = None) -> dict[str, float]:
    """Scores for `task`: predictions are class ids (argmax done by the caller) or, for STS-B,
    predicted similarity scores. `split` names the data in warnings."""
    if task not in SCORERS:
        raise choices_error("glue task", task, list(SCORERS))
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if task == "stsb":
        return _correlations(predictions, labels, split)
    return SCORERS[task](predictions, labels)
