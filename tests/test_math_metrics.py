"""GSM8K and MATH answer extraction and checking.

MATH_CASES is the table of prediction/gold answer pairs in MATH's own answer styles (most golds
are from the MATH test set). Each row gives our verdict and the verdict of Hendrycks et al.'s
`is_equiv` (hendrycks/math, modeling/math_equivalence.py, which MetaMath's eval_math.py uses),
worked out from that code and checked by running it outside this repository; every row where
the two differ says so in its reason ("differs: ..."), and the README lists these differences.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from rosa_bench.errors import UserError
from rosa_bench.metrics.math import GSM8K_RULE, gsm8k_gold, gsm8k_prediction, gsm8k_scores, math_scores
from rosa_bench.metrics.math_answers import last_boxed, math_prediction, normalize_math, stated_answer


@pytest.mark.parametrize("generation,expected", [
    ("So 3 + 4 = 7.\nThe answer is: 7", Fraction(7)),
    ("The answer is: 1,234", Fraction(1234)),
    ("The answer is: 1,234,567", Fraction(1234567)),  # MetaMath's regex reads 1234
    ("The answer is: -$5", Fraction(-5)),  # MetaMath's regex reads 5
    ("The answer is: $18.", Fraction(18)),
    ("The answer is: 18.50 dollars", Fraction(37, 2)),  # MetaMath rounds to 18 (or 19)
    ("The answer is: -5", Fraction(-5)),
    ("The answer is: 3/4", Fraction(3, 4)),  # MetaMath rounds to 1
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


def test_gsm8k_accuracy_counts_exactly_and_records_the_rule():
    predictions = ["The answer is: 18", "The answer is: $1,000.00", "no idea", "The answer is: 5",
                   "The answer is: 18.5"]
    references = [["18"], ["text #### 1,000"], ["3"], ["-5"], ["18"]]
    scores = gsm8k_scores(predictions, references)
    assert scores["accuracy"] == pytest.approx(40.0)  # 18.5 is not 18 (MetaMath would round it)
    assert scores["no_answer"] == 1.0
    assert scores["extraction"] == GSM8K_RULE


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("$\\boxed 7$", "7"),
    ("\\fbox{3}", "3"),
    ("nothing here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("generation,expected", [
    ("The answer is: 5. Next we check that 5 works.", "5"),  # not "5. Next we ..."
    ("The answer is: $\\frac{1}{2}$.\nQuestion: what is 2+2?", "$\\frac{1}{2}$"),
    ("The answer is: 3.5 meters. Done.", "3.5 meters"),
    ("First \\boxed{3}, but then The answer is: 4", "4"),  # the last stated answer counts
    ("The answer is: \\boxed{7}. Check: ok.", "7"),
    ("We get $x = \\boxed{\\text{odd}}$.", "\\text{odd}"),
    ("no answer stated", None),
])
def test_stated_answer(generation, expected):
    assert stated_answer(generation) == expected


MATH_CASES = [
    # (prediction answer, gold \boxed{} content, our verdict, Hendrycks' is_equiv verdict, reason)
    ("\\frac{1}{2}", "\\frac12", True, True, "unbraced digit arguments"),
    ("\\dfrac{3}{4}", "\\frac34", True, True, "\\dfrac is \\frac"),
    ("\\tfrac83", "\\frac{8}{3}", True, True, "\\tfrac with unbraced digits"),
    ("\\frac{1}{x}", "\\frac1x", True, True, "unbraced letter argument"),
    ("\\frac{\\sqrt{6}}{3}", "\\frac{\\sqrt6}3", True, False, "differs: unbraced argument after a group"),
    ("\\frac{\\pi}{4}", "\\frac\\pi4", True, False, "differs: a control word is one argument"),
    ("0.5", "\\frac{1}{2}", True, True, "the reference's 0.5 rule"),
    (".5", "\\frac{1}{2}", True, True, "leading zero added, then the 0.5 rule"),
    ("1/2", "\\frac{1}{2}", True, True, "integer a/b is \\frac{a}{b}"),
    ("-1/2", "-\\frac{1}{2}", True, False, "differs: the sign goes in front of the fraction"),
    ("\\frac{-3}{4}", "-\\frac{3}{4}", True, False, "differs: the sign goes in front of the fraction"),
    ("0.75", "\\frac{3}{4}", False, False, "no numeric equality beyond 0.5 (the reference's rule)"),
    ("\\frac{1}{3}", "\\frac{1}{2}", False, False, "different values"),
    ("2", "-2", False, False, "the sign counts"),
    ("10", "10\\text{ units}", True, True, "unit at the end"),
    ("18", "18\\text{ ways.}", True, True, "unit with a full stop"),
    ("7", "7\\text{ hours}.", True, True, "unit before the answer's full stop"),
    ("440", "440\\text{ cm}^2", True, True, "unit with a power"),
    ("15", "15\\mbox{ cm}^2", True, False, "differs: \\mbox units are units"),
    ("864", "864 \\mbox{ inches}^2", True, False, "differs: \\mbox units are units"),
    ("10", "10\\;\\text{edges}", True, False, "differs: thin spaces and units without a space"),
    ("0.25", "0.25\\,\\text{ cm}", True, False, "differs: thin space before the unit"),
    ("8\\sqrt{3}", "8\\sqrt{3} \\text { square inches}", True, False, "differs: '\\text {' with a space"),
    ("(3,4)", "(3\\text{ m}, 4\\text{ m})", True, False,
     "differs: units inside a tuple (two make the reference compare raw strings)"),
    ("19,43", "19 \\text{ and }43", True, False, "differs: 'and' separates a list"),
    ("19", "19 \\text{ and }43", False, True, "differs: the reference drops everything after '\\text{ '"),
    ("7,-2,-5", "7, -2, \\text{ and } -5", True, False, "differs: ', and' separates a list"),
    ("-2,-12", "-2 \\text{ or } -12", True, False, "differs: 'or' separates a list"),
    ("9", "9\\text{ a.m.}", False, True, "differs (stricter): a.m./p.m. are not units"),
    ("\\text{Evelyn}", "\\text{Devon}", False, False, "different words (both used to normalise to '')"),
    ("Evelyn", "\\text{Evelyn}", True, False, "differs: a word answer with or without \\text{}"),
    ("June 20", "\\text{June 20}", True, False, "differs: \\text{} unwrapped"),
    ("even", "\\text{odd}", False, False, "different word answers"),
    ("C", "\\text{(C)}", True, False, "differs: multiple-choice letter with or without parentheses"),
    ("(E)", "(\\text{E})", True, False, "differs: \\text{} unwrapped"),
    ("\\text{(B)}", "\\text{(D)}", False, False, "different choices"),
    ("15000", "\\$15,\\!000", True, False, "differs: thousands separator ,\\! and dollar sign"),
    ("8880", "8{,}880", True, False, "differs: thousands separator {,}"),
    ("15,600", "15600", True, False, "differs: plain thousands separators"),
    ("81, 256", "81 ,256", True, True, "a list: spaces do not count"),
    ("81256", "81, 256", False, False, "a list with spaces is not a grouped number"),
    ("81,256", "81, 256", False, True, "differs, known false negative: reads as one number"),
    ("70110", "70,110", True, False, "differs, known false positive: a list like a number"),
    ("37.5", "37.50", True, False, "differs: trailing decimal zeros"),
    ("2.5", "\\$2.50", True, False, "differs: dollar amount with trailing zero"),
    ("0.43", "0.34", False, False, "different decimals"),
    ("90", "90^\\circ", True, True, "degrees"),
    ("45", "45^{\\circ}", True, True, "degrees, braced"),
    ("10", "10\\%", True, True, "percent"),
    ("4", "x = 4", True, True, "'x = ' dropped"),
    ("4", "b=4", True, True, "'b=' dropped"),
    ("-50", "4x-5y=-50", False, False, "an equation is not 'x = value'"),
    ("[-2,7]", "x \\in [-2,7]", True, False, "differs: 'x \\in' dropped"),
    ("(x-2)(x+2)", "\\left(x-2\\right)\\left(x+2\\right)", True, True, "\\left and \\right"),
    ("10\\sqrt2", "10\\sqrt 2", True, False, "differs: the reference braces the space in '\\sqrt 2'"),
    ("\\sqrt[3]{2}", "\\sqrt[3]2", True, False, "differs: \\sqrt's optional index"),
    ("10, 4, -2", "4, 10, -2", False, False, "order of a list counts"),
    ("[0,\\infty)", "[0, \\infty)", True, True, "spaces"),
    ("1\\pm\\sqrt{19}", "1 \\pm \\sqrt{19}", True, True, "spaces"),
    ("\\begin{pmatrix}6\\\\3\\\\0\\end{pmatrix}", "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}",
     True, True, "matrix spacing"),
    ("18 ways", "18", True, False, "differs: a number followed by plain words"),
    ("5.", "5", True, False, "differs: a final full stop"),
]


@pytest.mark.parametrize("prediction,gold,verdict,reference,reason", MATH_CASES,
                         ids=[f"{i}-{c[4][:40]}" for i, c in enumerate(MATH_CASES)])
def test_math_answer_table(prediction, gold, verdict, reference, reason):
    assert (math_prediction(f"The answer is: {prediction}") == normalize_math(gold)) is verdict
    assert (verdict != reference) == reason.startswith("differs"), "a difference from the reference is named"


def test_math_answer_table_is_large_and_two_sided():
    verdicts = [case[2] for case in MATH_CASES]
    assert len(MATH_CASES) >= 40 and verdicts.count(False) >= 10


@pytest.mark.parametrize("generation", ["\\boxed{}", "The answer is: ", "The answer is: $$.",
                                        "\\boxed{\\text{ }}"])
def test_empty_answers_are_no_answer(generation):
    assert math_prediction(generation) is None


def test_math_test_golds_never_normalise_to_empty(data_root):
    path = data_root / "math" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    golds = [last_boxed(json.loads(line)["solution"]) for line in path.read_text().splitlines()]
    assert len(golds) == 5000 and all(normalize_math(gold) for gold in golds)


def test_math_accuracy():
    predictions = ["thus \\boxed{\\dfrac{1}{2}}", "The answer is: 3", "no box", "\\boxed{}"]
    references = [["\\frac12"], ["The result is $\\boxed{3}$."], ["4"], ["\\text{Evelyn}"]]
    assert math_prediction(predictions[2]) is None
    scores = math_scores(predictions, references)
    assert scores["accuracy"] == pytest.approx(50.0)
    assert scores["no_answer"] == 2.0
