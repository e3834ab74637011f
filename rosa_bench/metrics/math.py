"""Answer extraction and accuracy for GSM8K and MATH, with the prompt and answer marker of MetaMath.

GSM8K: the first number after the last "The answer is: " in the generation, with commas and `$`
removed, compared as an exact rational number with the gold answer after "#### ". MetaMath's
eval_gsm8k.py differs on purpose: it reads the number with the regex `[-+]?\\d*[.,/]?\\d+`
(one separator at most, so '1,234,567' reads as 1234 and '-$5' as 5, since the sign is not next
to the digit) and rounds it to an integer before comparing ('18.5' counts for 18, '3/4' for 1).
Ours reads 1234567 and -5 and counts 18.5 and 3/4 wrong; where both read a number the same way and
it is an integer, the verdicts agree.
MATH: see rosa_bench/metrics/math_answers.py (Hendrycks et al.'s normaliser, with fixes).
The rule used is returned with the scores, so results say how they were counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from rosa_bench.errors import UserError
from rosa_bench.metrics.math_answers import ANSWER_MARKER, last_boxed, math_prediction, normalize_math

GSM8K_GOLD_MARKER = "#### "
GSM8K_RULE = (f"first number after the last {ANSWER_MARKER!r} (commas, $ and units removed), "
              f"exact rational comparison with the gold answer after {GSM8K_GOLD_MARKER!r}")
MATH_RULE = (f"after the last {ANSWER_MARKER!r} its \\boxed{{}} or else its first sentence (no marker: "
             "the last \\boxed{}), Hendrycks string normalisation with rosa-bench's fixes, exact match "
             "with the normalised gold \\boxed{}")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact fraction: '$1,234.50.' -> 2469/2."""
    match = NUMBER.search(text.replace(",", "").replace("$", ""))
    if match is None:
        return None
    try:
        return Fraction(match.group())
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_prediction(generation: str) -> Fraction | None:
    """The model's answer, or None when the generation states no answer."""
    if ANSWER_MARKER not in generation:
        return None
    return parse_number(generation.rsplit(ANSWER_MARKER, 1)[1])


def gsm8k_gold(solution: str) -> Fraction:
    """The gold answer of a GSM8K solution ('... #### 1,000')."""
    if GSM8K_GOLD_MARKER not in solution:
        raise UserError(f"GSM8K solution has no {GSM8K_GOLD_MARKER!r} answer: {solution!r:.200}")
    value = parse_number(solution.rsplit(GSM8K_GOLD_MARKER, 1)[1])
    if value is None:
        raise UserError(f"GSM8K answer after {GSM8K_GOLD_MARKER!r} is not a number: {solution!r:.200}")
    return value


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference groups; "
                        "the counts must be equal and non-zero")


def gsm8k_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | str]:
    """Accuracy (0..100); references[i][0] is the gold solution or bare answer."""
    _check(predictions, references)
    answers = [gsm8k_prediction(p) for p in predictions]
    gold = [gsm8k_gold(g[0] if GSM8K_GOLD_MARKER in g[0] else GSM8K_GOLD_MARKER + g[0]) for g in references]
    correct = sum(a is not None and a == g for a, g in zip(answers, gold))
    return {"accuracy": 100.0 * correct / len(answers), "no_answer": float(answers.count(None)),
            "extraction": GSM8K_RULE}


def math_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | str]:
    """Accuracy (0..100); references[i][0] is the gold solution (with \\boxed{}) or answer."""
    _check(predictions, references)
    answers = [math_prediction(p) for p in predictions]
    gold = [normalize_math(last_boxed(g[0]) or g[0]) for g in references]
    correct = sum(a is not None and a == g for a, g in zip(answers, gold))
    return {"accuracy": 100.0 * correct / len(answers), "no_answer": float(answers.count(None)),
            "extraction": MATH_RULE}
