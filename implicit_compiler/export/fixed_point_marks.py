"""The marks ``to_onnx`` puts on each fixed-point ``Loop`` it writes, and their reader.

A cyclic component's Loop (``onnx_export``) iterates accelerated sweeps x' = G(x) until the
residual is under tol. Its node's ``doc_string`` (a standard field, free text for ONNX) holds one
JSON object:

    {"implicit_compiler.fixed_point": {
        "version": 1,
        "meaning": "...",                      (for a human reader)
        "states": [{"block": name, "shape": [...],  (the state block and its sample shape)
                    "carried": body input,     (the Loop-carried x_k the sweep reads)
                    "sweep": body tensor,      (G_k(x), the sweep's result for x_k)
                    "output": Loop output},    (the fixed point x_k* = G_k(x*))
                   ...],                       (in the order of the Loop's state inputs)
        "residual": Loop output}}              (the last relative residual, (N,))

``from_onnx`` (``frontend.ops.fixed_point``) reads a Loop so marked as the fixed point
x = G(x); it lowers only the part of the body from the carried states (and outer-scope
tensors) to the sweep's results, never the acceleration nodes. A Loop without the key is no
fixed point of ours; ``read_fixed_point_marks`` returns None for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KEY = "implicit_compiler.fixed_point"
VERSION = 1
MEANING = (
    "the Loop iterates sweeps x' = G(x) of the states (Anderson-accelerated) until the relative residual is at most "
    "fixed_point_tolerance; its state outputs are the fixed point x = G(x): each state's 'sweep' tensor is G_k of "
    "the 'carried' body inputs"
)


@dataclass(frozen=True)
class FixedPointState:
    """One state block of a fixed-point Loop (module docstring)."""

    block: str
    shape: tuple[int, ...]
    carried: str
    sweep: str
    output: str


@dataclass(frozen=True)
class FixedPointMarks:
    states: tuple[FixedPointState, ...]
    residual: str


def fixed_point_marks(states: list[FixedPointState], residual: str) -> str:
    """The Loop node's doc_string (module docstring)."""
    entries = [
        {"block": s.block, "shape": list(map(int, s.shape)), "carried": s.carried, "sweep": s.sweep, "output": s.output}
        for s in states
    ]
    marks = {"version": VERSION, "meaning": MEANING, "states": entries, "residual": residual}
    return json.dumps({KEY: marks})


def read_fixed_point_marks(doc_string: str) -> FixedPointMarks | None:
    """The marks of a Loop's doc_string; None when it holds none (not a Loop of ours).

    Raises ValueError, saying what is wrong, for marks that are there but malformed."""
    try:
        document = json.loads(doc_string)
    except ValueError:
        return None
    if not isinstance(document, dict) or KEY not in document:
        return None
    marks = document[KEY]
    if not isinstance(marks, dict) or marks.get("version") != VERSION:
        raise ValueError(f"its marks are not version {VERSION} of {KEY!r}")
    states, residual = marks.get("states"), marks.get("residual")
    if not isinstance(states, list) or not states or not isinstance(residual, str):
        raise ValueError("its marks need a non-empty list 'states' and a 'residual' output name")
    return FixedPointMarks(tuple(_state(entry) for entry in states), residual)


def _state(entry: object) -> FixedPointState:
    names = ("block", "carried", "sweep", "output")
    if not isinstance(entry, dict) or not all(isinstance(entry.get(name), str) for name in names):
        raise ValueError(f"a state's marks need the names {list(names)}: {entry!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"a state's 'shape' must be a list of sizes: {entry!r}")
    return FixedPointState(entry["block"], tuple(shape), entry["carried"], entry["sweep"], entry["output"])
