"""Command-line plumbing shared by the entry points: the seed projects' override form and
clean exits for user mistakes."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

from rosa_bench.errors import RunFailed, UserError, choices_error

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SELECTABLE_GROUPS = ("model", "dataset", "fnmodel", "train", "logging")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _selection(group: str, value: str, arg: str) -> str:
    """The override that selects `value` in `group`, or an error listing the options.
    Unknown model names stay a `model.name=` override: they are hub ids."""
    options = group_options(group)
    if all(v in options for v in value.split(",")):
        return f"{group}={value}"
    if group == "model":
        return f"model.name={value}"
    bad = next(v for v in value.split(",") if v not in options)
    raise choices_error(f"{group} (in {arg!r})", bad, options)


def normalize_overrides(args: list[str]) -> list[str]:
    """Make `fnmodel.name=rosa` mean exactly `fnmodel=rosa` (the seed projects' form and
    Hydra's group form), and reject unknown options before anything loads."""
    out = []
    for arg in args:
        seed_form = re.fullmatch(r"(\w+)\.name=(.+)", arg)
        group_form = re.fullmatch(r"(\w+)=(.+)", arg)
        match = seed_form or group_form
        if match and match.group(1) in SELECTABLE_GROUPS and not arg.startswith("-"):
            out.append(_selection(match.group(1), match.group(2), arg))
        else:
            out.append(_quote_tildes(arg))
    return out


def _quote_tildes(arg: str) -> str:
    """`fnmodel.adapter=lowrank~linear` (ColA's mixes, as the seed writes them) quoted for Hydra,
    whose override grammar rejects a bare '~' inside a value; sweeps quote each choice."""
    match = re.fullmatch(r"([\w.]+)=([^'\"].*)", arg)
    if not match or "~" not in match.group(2):
        return arg
    return f"{match.group(1)}=" + ",".join(f"'{v}'" for v in match.group(2).split(","))


def exit_on_user_error(fn: Callable) -> Callable:
    """Run `fn`; a UserError becomes one line on stderr and exit code 2, a failed run (RunFailed)
    one line and exit code 3; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunFailed as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(3)

    return wrapper
