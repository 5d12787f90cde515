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

import numpy as np

from .errors import ArgumentTypeError, ArgumentValueError


def integer(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum. Integers only (numpy's too): a float such as 1.5 or 10.0
    is refused rather than rounded, and so is a bool."""
    if type(value) is not int:  # (the common case skips the slower checks: predict calls this)
        value = _unwrapped(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name}: expected an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ArgumentValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def real(value: Any, name: str, expected: str = "a finite number", finite: bool = True) -> float:
    """``value`` as a float, finite unless ``finite`` is False (the caller checks the range).
    Real numbers only (numpy's too): a string such as "0.9" is refused, not parsed
    (``expected`` says what the argument means, for the message)."""
    value = _unwrapped(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if finite and not math.isfinite(number):
        raise ArgumentValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    """``value`` when it is one of the strings ``choices``."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name}: expected one of {', '.join(choices)}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ArgumentValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _unwrapped(value: Any) -> Any:
    """A 0-d numpy array as its scalar (np.array(0.5) is a number to the user)."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def real_values(value: Any, name: str) -> Any:
    """``value`` as given when it is a real number or an array (or nested sequence) of them.
    Strings, None and arrays of strings, objects or complex numbers are refused before numpy
    parses them ("1.5" would silently become 1.5, "abc" a bare ValueError naming nothing)."""
    if value is None or isinstance(value, (str, bytes)):
        raise ArgumentTypeError(f"{name}: expected a number or an array of real numbers, got {value!r}")
    try:
        dtype = np.asarray(value).dtype
    except (TypeError, ValueError):  # ragged nesting
        dtype = np.dtype(object)
    if dtype.kind not in "biuf":
        raise ArgumentTypeError(f"{name}: expected a number or an array of real numbers, got {value!r} (dtype {dtype})")
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
