"""GLUE metrics against values worked out by hand from small confusion matrices; a diverged
STS-B model's NaN scores, how the trainer ranks them, and how they are written to JSON."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from rosa_bench import runs
from rosa_bench.errors import UserError
from rosa_bench.metrics import glue_metrics
from rosa_bench.train.loop import Trainer


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


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_stsb_prediction_gives_nan_with_a_warning_naming_the_split(bad):
    with pytest.warns(UserWarning, match=r"STS-B on split 'validation': 1 of 4 predictions are NaN or inf"):
        scores = glue_metrics("stsb", [1.0, bad, 3.0, 4.0], [1.0, 3.0, 2.0, 10.0], split="validation")
    assert set(scores) == {"pearson", "spearmanr", "combined"}
    assert all(math.isnan(value) for value in scores.values())


def track(values: list[float], greater_is_better: bool = True, best: dict | None = None) -> dict:
    """The best entry after the trainer's _track_best, starting from `best`, sees `values` at
    steps 1, 2, ... (no process is the main one, so nothing is saved)."""
    printed: list[str] = []
    trainer = SimpleNamespace(
        task=SimpleNamespace(metric_name="combined", greater_is_better=greater_is_better,
                             validation_splits=["validation"]),
        accelerator=SimpleNamespace(is_main_process=False, print=printed.append),
        logger=SimpleNamespace(best=lambda scores, step: None),
        best=best or {}, epoch=0, global_step=0, _write_metrics=lambda complete: None)
    for step, value in enumerate(values, start=1):
        trainer.global_step = step
        Trainer._track_best(trainer, {"combined": value})
    return trainer.best | {"printed": printed}


def test_the_trainer_ranks_a_nan_score_worst():
    assert track([0.2, math.nan, 0.5, math.nan, 0.4])["step"] == 3
    assert track([math.nan, 0.1])["step"] == 2  # a first NaN is kept only until a number comes
    assert track([math.nan, math.nan])["step"] == 1
    assert track([0.9, math.nan, 0.5], greater_is_better=False)["step"] == 3  # losses: lower is better
    assert track([0.1], best={"value": None, "step": 0})["step"] == 1  # NaN read back from JSON (null)
    printed = track([math.nan])["printed"]
    assert printed == ["warning: combined on split 'validation' is NaN at step 1; it ranks worst for the "
                       "best checkpoint"]


def test_a_nan_score_is_written_as_strict_json_null(tmp_path):
    path = tmp_path / "metrics.json"
    runs.write_json(path, {"best": {"value": math.nan, "scores": [1.5, math.inf]}, "n": 3})

    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    written = json.loads(path.read_text(), parse_constant=reject)
    assert written == {"best": {"value": None, "scores": [1.5, None]}, "n": 3}


def test_unknown_task():
    with pytest.raises(UserError, match=r"unknown glue task 'sts'; choose one of: cola, mnli"):
        glue_metrics("sts", [1], [1])


def test_stsb_submission_keeps_a_diverged_prediction_visible():
    """Finite scores are clipped to STS-B's [0, 5]; NaN/inf are written as nan, not as 5.000."""
    from types import SimpleNamespace

    from rosa_bench.evaluate import submission_label

    task = SimpleNamespace(name="glue/stsb")
    labels = [submission_label(task, v) for v in (math.nan, math.inf, 6.0, -1.0, 2.5)]
    assert labels == ["nan", "nan", "5.000", "0.000", "2.500"]
