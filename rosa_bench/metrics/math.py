"""Answer extraction and accuracy for math word problems, following the MetaMath protocol.

GSM8K: the answer is the first number after the last "The answer is: " in the generation
(commas, currency signs and units dropped), compared as an exact rational number with the
gold answer after "#### ". MATH: the last \\boxed{...} in the generation (or after the
answer marker when there is no box), compared with the gold \\boxed{} after the string
normalisation of Hendrycks et al. (spaces, \\left/\\right, units, \\dfrac, 0.5 vs .5, a/b).
The rule used is returned with the scores, so results say how they were counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from rosa_bench.errors import UserError

ANSWER_MARKER = "The answer is: "
GSM8K_GOLD_MARKER = "#### "
GSM8K_RULE = (f"first number after the last {ANSWER_MARKER!r} (commas, $ and units removed), "
              f"exact rational comparison with the gold answer after {GSM8K_GOLD_MARKER!r}")
MATH_RULE = (f"last \\boxed{{}} (else the text after the last {ANSWER_MARKER!r}), Hendrycks "
             "string normalisation, exact match with the gold \\boxed{}")
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


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced) or `\\boxed x`; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    if text[start:].startswith("\\boxed ") and not text[start:].startswith("\\boxed {"):
        return text[start + len("\\boxed "):].split("$")[0].strip()
    if len(rest) < 2:
        return None
    depth, out = 1, []
    for char in rest[1]:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return "".join(out)
        out.append(char)
    return None


def _fix_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)


def normalize_math(answer: str) -> str:
    """Hendrycks-style canonical string for comparing MATH answers."""
    text = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", text.strip()).strip()  # trailing units
    text = re.sub(r"\\(?:text|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", text)  # .5 -> 0.5
    if re.fullmatch(r"[a-zA-Z]\s*=.*", text) and len(text.split("=")[0].strip()) <= 2:
        text = text.split("=", 1)[1]  # "x = 5" -> "5"
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if re.fullmatch(r"-?\d+/\d+", text):
        num, den = text.split("/")
        text = f"\\frac{{{num}}}{{{den}}}"
    text = text.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def math_prediction(generation: str) -> str | None:
    boxed = last_boxed(generation)
    if boxed is None and ANSWER_MARKER in generation:
        boxed = generation.rsplit(ANSWER_MARKER, 1)[1].strip()
    return None if boxed is None else normalize_math(boxed)


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
