"""Command-line plumbing shared by the entry points: the seed projects' override form and
clean exits for user mistakes."""

from __future__ import annotations

import functools
import os
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
    one line and exit code 3; no traceback. A Hydra or OmegaConf error raised while `fn` runs is
    the program's own, not a bad override: it is marked so that `exit_on_config_error` (around
    the Hydra entry point) lets its traceback through."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

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
        except (HydraException, OmegaConfBaseException) as err:
            err.raised_inside_the_task = True
            raise

    return wrapper


def config_error_line(err: Exception) -> str:
    """One line for an override Hydra cannot apply: the unknown key with the keys its section
    has, or the override it cannot parse."""
    from hydra.errors import OverrideParseException

    cause = err.__cause__
    key, parent = getattr(cause, "full_key", None), getattr(cause, "parent_node", None)
    if key and parent is not None and hasattr(parent, "keys"):
        section = key.rsplit(".", 1)[0] if "." in key else "the config"
        return f"unknown option {key!r}; {section} has: {', '.join(sorted(map(str, parent.keys())))}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {err.message.splitlines()[0]}"
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()
                    and not line.strip().startswith(("Config search path", "provider=")))


def exit_on_config_error(fn: Callable) -> Callable:
    """Run a `hydra.main` function so that an override Hydra cannot compose (an unknown key, a
    typo, bad override syntax) is one line and exit code 2, like every other bad input. Hydra
    is asked to re-raise its errors (HYDRA_FULL_ERROR) instead of printing them itself; an
    error that is not about the config, or one raised inside the task function (marked by
    `exit_on_user_error`), then keeps its full traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            return fn(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            if getattr(err, "raised_inside_the_task", False):
                raise
            print(f"error: {config_error_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper
