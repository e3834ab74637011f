"""The one exception type for user mistakes: the CLIs print its message and exit non-zero
without a traceback."""


class UserError(Exception):
    """A bad value from the user (config, data path, model name...). The message names the
    bad value and the valid choices."""


def choices_error(kind: str, value: object, choices: list[str] | tuple[str, ...]) -> UserError:
    """Build the standard 'unknown X' error so every registry words it the same way."""
    listed = ", ".join(sorted(str(c) for c in choices))
    return UserError(f"unknown {kind} {value!r}; choose one of: {listed}")


class RunFailed(Exception):
    """The run itself failed (not a bad input), e.g. its loss became NaN. The CLIs print its
    one-line message and exit 3."""
