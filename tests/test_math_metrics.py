"""GSM8K and MATH answer extraction on tricky strings, and accuracy with its recorded rule."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rosa_bench.errors import UserError
from rosa_bench.metrics.math import (
    GSM8K_RULE,
    gsm8k_gold,
    gsm8k_prediction,
    gsm8k_scores,
    last_boxed,
    math_prediction,
    math_scores,
    normalize_math,
)


@pytest.mark.parametrize("generation,expected", [
    ("So 3 + 4 = 7.\nThe answer is: 7", Fraction(7)),
    ("The answer is: 1,234", Fraction(1234)),
    ("The answer is: $18.", Fraction(18)),
    ("The answer is: 18.50 dollars", Fraction(37, 2)),
    ("The answer is: -5", Fraction(-5)),
    ("The answer is: 3/4", Fraction(3, 4)),
    ("The answer is: 2\nThe answer is: 10 apples", Fraction(10)),  # the last marker counts
    ("I think it is 12", None),  # no marker: no answer
    ("The answer is: none of them", None),
])
def test_gsm8k_prediction(generation, expected):
    assert gsm8k_prediction(generation) == expected


def test_gsm8k_gold_and_errors():
    assert gsm8k_gold("48/2 = <<48/2=24>>24\n#### 1,000") == Fraction(1000)
    with pytest.raises(UserError, match="no '#### ' answer"):
        gsm8k_gold("just text")


def test_gsm8k_accuracy_counts_and_records_the_rule():
    predictions = ["The answer is: 18", "The answer is: $1,000.00", "no idea", "The answer is: 5"]
    references = [["18"], ["text #### 1,000"], ["3"], ["-5"]]
    scores = gsm8k_scores(predictions, references)
    assert scores["accuracy"] == pytest.approx(50.0)
    assert scores["no_answer"] == 1.0
    assert scores["extraction"] == GSM8K_RULE


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("$\\boxed 7$", "7"),
    ("nothing here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("a,b", [
    ("\\dfrac{1}{2}", "\\frac12"), ("0.5", ".5"), ("1/2", "\\frac{1}{2}"),
    ("10\\text{ inches}", "10"), ("90^\\circ", "90"), ("x = 3", "3"), ("\\left( 1, 2 \\right)", "(1,2)"),
    ("5.", "5"), ("\\$4.00", "4"),
])
def test_math_normalisation_equates(a, b):
    assert normalize_math(a) == normalize_math(b)


def test_math_normalisation_keeps_different_answers_apart():
    assert normalize_math("\\frac{1}{3}") != normalize_math("\\frac{1}{2}")
    assert normalize_math("-2") != normalize_math("2")


def test_math_accuracy():
    predictions = ["thus \\boxed{\\dfrac{1}{2}}", "The answer is: 3", "no box"]
    references = [["\\frac12"], ["The result is $\\boxed{3}$."], ["4"]]
    assert math_prediction(predictions[2]) is None
    scores = math_scores(predictions, references)
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert scores["no_answer"] == 1.0
