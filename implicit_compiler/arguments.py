"""Checks of the plain arguments users pass to the public functions (counts, numbers, models).

One place for them, so that every entry point refuses a bad argument the same way: a typed
error (``ArgumentTypeError``, a TypeError, for the wrong kind of value; ``ArgumentValueError``,
a ValueError, for a value out of range) whose message names the argument, the value given and
what is expected. Without these, a string reaches ``float()`` or ``range()`` deep inside and
surfaces as a bare builtin error naming nothing the user wrote.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import ArgumentTypeError, ArgumentValueError


def integer(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum. Integers only (numpy's too): a float such as 1.5 or 10.0
    is refused rather than rounded, and so is a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name}: expected an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ArgumentValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def real(value: Any, name: str, expected: str = "a finite number", finite: bool = True) -> float:
    """``value`` as a float, finite unless ``finite`` is False (the caller checks the range).
    Real numbers only (numpy's too): a string such as "0.9" is refused, not parsed
    (``expected`` says what the argument means, for the message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if finite and not math.isfinite(number):
        raise ArgumentValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def numeric_array(value: Any, name: str) -> Any:
    """Refuse strings, None and other non-numeric values before numpy parses them ("1.5" would
    become 1.5, "abc" a bare ValueError); numbers, arrays and nested sequences pass as given."""
    if value is None or isinstance(value, (str, bytes)):
        raise ArgumentTypeError(f"{name}: expected a number or an array of numbers, got {value!r}")
    return value


def model(value: Any, name: str) -> Any:
    """``value`` itself when it is an ``ImplicitModel`` (compositions take models, not arrays)."""
    from .model import ImplicitModel

    if not isinstance(value, ImplicitModel):
        raise ArgumentTypeError(
            f"{name}: expected an ImplicitModel (from from_onnx, from_matrices or load), got {value!r} "
            f"({type(value).__name__})"
        )
    return value
