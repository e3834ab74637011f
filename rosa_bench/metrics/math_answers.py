"""MATH answers: where the answer is in a generation, and the canonical string two answers are
compared by.

The normaliser follows Hendrycks et al.'s `is_equiv` (hendrycks/math, modeling/math_equivalence.py,
which MetaMath's eval_math.py also uses) step by step, with the fixes and deliberate differences
listed in the README's Evaluation section; tests/test_math_metrics.py holds the table of cases.
"""

from __future__ import annotations

import re

ANSWER_MARKER = "The answer is: "

THOUSANDS_MARK = re.compile(r"(\d)\s*(?:,\s*\\!|\{,\})\s*(?=\d)")  # 15,\!000 and 8{,}880
THIN_SPACE = re.compile(r"(?<!\\)\\(?:[,;:]|q?quad\b)")
TEXT_COMMAND = r"\\(?:text|textbf|textrm|mbox|mathrm)\s*"
LIST_WORD = re.compile(r"\s*,?\s*" + TEXT_COMMAND + r"\{\s*,?\s*(?:and|or)\s*\}\s*")
# a word-only \text{} after an expression, then a power, ending the answer or a list item
UNIT = re.compile(r"(?<=[\w})\]])\s*" + TEXT_COMMAND + r"\{\s*[A-Za-z][A-Za-z ]*\.?\s*\}(?:\^\{?\d\}?)?"
                  r"\s*(?=$|[,)\]]|\\\})")
TEXT_GROUP = re.compile(TEXT_COMMAND + r"\{([^{}]*)\}")
CHOICE = re.compile(r"\(([A-Z])\)")
NUMBER_THEN_WORDS = re.compile(r"(-?[\d.,/]+)\s+[A-Za-z]{2,}[A-Za-z ]*")
GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
PLAIN_FRACTION = re.compile(r"(-?)(\d+)/(\d+)")
DECIMAL = re.compile(r"-?\d+\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (braces balanced) or `\\boxed x`; None if absent."""
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


def stated_answer(generation: str) -> str | None:
    """The answer a generation states last: after the last "The answer is: " its \\boxed{} if it
    has one, else that line up to the first sentence end; with no marker, the last \\boxed{}."""
    if ANSWER_MARKER not in generation:
        return last_boxed(generation)
    tail = generation.rsplit(ANSWER_MARKER, 1)[1]
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    line = tail.strip().split("\n", 1)[0]
    return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]


def _argument(text: str, i: int) -> tuple[str, int]:
    """The undelimited LaTeX argument at text[i:] (spaces skipped, as TeX does): a braced group's
    content, a control word or one character; and the index after it."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i == len(text):
        return "", i
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j], j + 1
        return text[i + 1:], len(text)
    if text[i] == "\\":
        word = re.match(r"\\(?:[A-Za-z]+|.?)", text[i:]).group()
        return word, i + len(word)
    return text[i], i + 1


def brace_arguments(text: str, command: str, count: int) -> str:
    """Every `command`'s first `count` arguments in braces: \\frac1x -> \\frac{1}{x},
    \\frac{\\sqrt6}3 -> \\frac{\\sqrt6}{3}, \\sqrt[3] 2 -> \\sqrt[3]{2} (nested ones too)."""
    out, i = [], 0
    while (start := text.find(command, i)) >= 0:
        out.append(text[i:start] + command)
        i = start + len(command)
        if text[i:].lstrip().startswith("["):
            close = text.find("]", i) + 1 or len(text)
            out.append(text[i:close].strip())
            i = close
        for _ in range(count):
            argument, i = _argument(text, i)
            out.append("{" + brace_arguments(argument, command, count) + "}")
    out.append(text[i:])
    return "".join(out)


def _strip_units(text: str) -> str:
    """'19 \\text{ and }43' -> '19,43'; '5\\text{ cm}^2' and '(3\\text{ m}, 4\\text{ m})' lose their units."""
    text = LIST_WORD.sub(",", text)
    return UNIT.sub("", text)


def _number_form(text: str) -> str:
    """Canonical form of a plain number: '2.50' -> '2.5', '-1/2' and '0.5' -> fractions;
    anything else unchanged."""
    if DECIMAL.fullmatch(text):
        text = text.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?0\.5", text):
        text = text.replace("0.5", "1/2")
    if match := PLAIN_FRACTION.fullmatch(text):
        sign, numerator, denominator = match.groups()
        text = f"{sign}\\frac{{{numerator}}}{{{denominator}}}"
    return text


def normalize_math(answer: str) -> str:
    """Canonical string for comparing MATH answers (Hendrycks' steps, in their order, plus the
    fixes listed in the README). '' means no answer."""
    text = THOUSANDS_MARK.sub(r"\1", answer.replace("\n", ""))
    text = THIN_SPACE.sub(" ", text.replace("\\!", ""))
    text = text.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    for command in ("\\left", "\\right", "\\displaystyle", "^{\\circ}", "^\\circ", "\\$", "$"):
        text = text.replace(command, "")
    text = _strip_units(text.strip().rstrip(".").strip())
    text = TEXT_GROUP.sub(r"\1", text).strip()
    if match := CHOICE.fullmatch(text):
        text = match.group(1)  # multiple choice "(C)" -> "C"
    text = text.replace("\\%", "").replace("%", "")
    if match := NUMBER_THEN_WORDS.fullmatch(text):
        text = match.group(1)
    if GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")  # '15,600' -> '15600', but '81, 256' stays a list
    text = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", text)  # .5 -> 0.5
    if text.count("=") == 1 and re.fullmatch(r"[A-Za-z][\w']?", text.split("=")[0].strip()):
        text = text.split("=")[1]  # "x = 5" -> "5"
    text = re.sub(r"^[A-Za-z]\s*\\in\s*", "", text)  # "x \in [2, 5]" -> "[2, 5]"
    text = brace_arguments(brace_arguments(text, "\\frac", 2), "\\sqrt", 1)
    text = text.replace(" ", "").replace("\\frac{-", "-\\frac{").rstrip(".")
    return _number_form(text)


def math_prediction(generation: str) -> str | None:
    """The generation's normalised answer, or None when it states none (or an empty one)."""
    answer = stated_answer(generation)
    if answer is None:
        return None
    return normalize_math(answer) or None
