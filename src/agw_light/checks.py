"""Checks of plain argument values, shared by the library: one definition of "an integer" and "a number".

`True` is an `int` to Python, and a numpy scalar is not one, so `isinstance(value, int)` both accepts a flag
where a count belongs and refuses a count read from an array. These predicates say what the library means.
"""

from __future__ import annotations

import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """Whether `value` is a whole number: a Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether `value` is a real number: a Python or numpy integer or float (nan included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is an integer >= 1.

    Args:
        value: the value to check (a Python or numpy integer).
        name: how the error names it (the argument or config key).

    Returns:
        The value as a Python int.
    """
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
