"""GLUE metrics against values worked out by hand from small confusion matrices."""

from __future__ import annotations

import math

import pytest

from rosa_bench.errors import UserError
from rosa_bench.metrics import glue_metrics


def confusion(tp: int, fp: int, fn: int, tn: int) -> tuple[list[int], list[int]]:
    """(predictions, labels) with exactly these counts."""
    pairs = [(1, 1)] * tp + [(1, 0)] * fp + [(0, 1)] * fn + [(0, 0)] * tn
    return [p for p, _ in pairs], [y for _, y in pairs]


def test_f1_and_accuracy_from_a_confusion_matrix():
    predictions, labels = confusion(tp=3, fp=1, fn=2, tn=4)
    scores = glue_metrics("mrpc", predictions, labels)
    # F1 = 2TP / (2TP + FP + FN) = 6 / 9; accuracy = (TP + TN) / 10
    assert scores == pytest.approx({"accuracy": 7 / 10, "f1": 6 / 9})
    assert all(type(value) is float for value in scores.values())


def test_matthews_from_a_confusion_matrix():
    predictions, labels = confusion(tp=3, fp=1, fn=2, tn=4)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(4*5*5*6)
    assert glue_metrics("cola", predictions, labels) == pytest.approx(
        {"matthews_correlation": 10 / math.sqrt(600)})


def test_matthews_is_negative_when_predictions_are_anti_correlated():
    predictions, labels = confusion(tp=1, fp=3, fn=4, tn=2)
    # (1*2 - 3*4) / sqrt(4*5*5*6) = -10 / sqrt(600)
    scores = glue_metrics("cola", predictions, labels)
    assert scores["matthews_correlation"] == pytest.approx(-10 / math.sqrt(600))


def test_multiclass_accuracy_for_mnli():
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_pearson_and_spearman_for_stsb():
    # x deviations -1.5 -0.5 0.5 1.5; y = [1, 3, 2, 10] has mean 4 and deviations -3 -1 -2 6:
    # pearson = 13 / sqrt(5 * 50); the ranks of y are 1 3 2 4, so spearman = 4 / 5
    scores = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 10.0])
    pearson = 13 / math.sqrt(250)
    expected = {"pearson": pearson, "spearmanr": 4 / 5, "combined": (pearson + 4 / 5) / 2}
    assert scores == pytest.approx(expected)


def test_constant_regression_predictions_score_zero_not_nan():
    scores = glue_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 3.0, 5.0])
    assert scores == {"pearson": 0.0, "spearmanr": 0.0, "combined": 0.0}


def test_unknown_task():
    with pytest.raises(UserError, match=r"unknown glue task 'sts'; choose one of: cola, mnli"):
        glue_metrics("sts", [1], [1])
