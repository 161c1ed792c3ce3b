"""Errors a user can act on: one error type, the checks that raise it, and how a command reports it.

Every entry point checks its input where it reads it and raises InputError naming where the value came from
(a file, or a function), the key or argument, what was found and what is allowed:

    path/config.json: hidden_size must be an integer >= 1 and <= 2147483647, got 'abc'
    Llama: temperature must be >= 0 (0 is greedy) and finite, got nan

InputError is a ValueError, so callers that catch ValueError (as the command-line tools do) keep working; a
value of the wrong type raises InputTypeError, which is also a TypeError. The command-line tools print such an
error as one line and exit with status 1 (run_command); anything else is a bug of ours and keeps its traceback.
This module needs the standard library alone: llama31.config (and so the model core) imports it.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

__all__ = ["USER_ERRORS", "InputError", "InputTypeError", "check_bool", "check_int", "check_number", "check_object",
           "message", "run_command"]


# ---------------------------------------------------------------------------------------------- checking values


class InputError(ValueError):
    """A value a user supplied that is not allowed.

    source: where it came from: a file ("ckpt/config.json") or a function ("Llama.generate").
    key: the key or argument ("hidden_size", "rope_scaling.factor"), or None for the file as a whole.
    problem: what is wrong and what is allowed ("must be an integer >= 1, got 'abc'").
    """

    def __init__(self, source: Any, key: str | None, problem: str):
        self.source, self.key, self.problem = str(source), key, problem
        super().__init__(f"{self.source}: {key} {problem}" if key else f"{self.source}: {problem}")

    def renamed(self, source: Any, key: str | None) -> "InputError":
        """The same problem, reported for another source and key (a ModelArgs field -> the file's key)."""
        return type(self)(source, key, self.problem)


class InputTypeError(InputError, TypeError):
    """An InputError for a value of the wrong type; callers may catch it as TypeError or as ValueError."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(value: Any, key: str, source: Any, *, minimum: int | None = None, maximum: int | None = None,
              integral_floats: bool = False) -> int:
    """value as an int in [minimum, maximum]; InputError naming source and key otherwise.

    Booleans are refused (True is an int to Python, never a size to a user). integral_floats: accept 4096.0
    as 4096 (JSON writers may emit one), never 2.5.
    """
    bounds = (f" >= {minimum}" if minimum is not None else "") + (
        f" and <= {maximum}" if minimum is not None and maximum is not None else
        f" <= {maximum}" if maximum is not None else "")
    if integral_floats and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(source, key, f"must be an integer{bounds}, got {_shown(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(source, key, f"must be an integer{bounds}, got {_shown(value)}")
    return value


def check_number(value: Any, key: str, source: Any, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """value as a finite float with value >= minimum, value > above, value <= maximum (each if given)."""
    bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                      f"> {above}" if above is not None else "",
                                      f"<= {maximum}" if maximum is not None else "") if b)
    allowed = f"must be a finite number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(source, key, f"{allowed}, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (10**400)
        raise InputError(source, key, f"{allowed}, got {_shown(value)}") from None
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (above is not None and number <= above) or (maximum is not None and number > maximum)):
        raise InputError(source, key, f"{allowed}, got {_shown(value)}")
    return number


def check_bool(value: Any, key: str, source: Any) -> bool:
    """value, which must be True or False (the string "false" is not false)."""
    if not isinstance(value, bool):
        raise InputTypeError(source, key, f"must be true or false, got {_shown(value)}")
    return value


def check_object(value: Any, key: str | None, source: Any) -> dict:
    """value, which must be a dict (a JSON object)."""
    if not isinstance(value, dict):
        raise InputTypeError(source, key, f"must be a JSON object {{...}}, got {type(value).__name__} "
                                          f"{_shown(value)}")
    return value


# ---------------------------------------------------------------------------------------------- commands
USER_ERRORS = (OSError, KeyError, ValueError)  # what our checks raise; anything else is a bug of ours


def message(error: BaseException) -> str:
    """The text of an error as a user should read it (str() of a KeyError adds quotes around it)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def run_command(body: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command-line tool's work and return its exit status.

    A user error (USER_ERRORS: a missing file, a malformed input) is printed as one line, "error: ...", on
    stderr and gives status 1; debug=True (the tools' --debug flag) lets it raise with its traceback instead.
    Any other exception is a bug and propagates with its traceback.
    """
    try:
        return body()
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {message(error)}", file=sys.stderr)
        return 1
