"""A small ONNX graph writer for the exporter: unique names, initializers, nodes, and the few
ops whose form depends on the opset (reductions, slices, pads).

Every value is named once in the whole model (Loop bodies included: ONNX forbids a body value
shadowing an outer one), so names are drawn from one pool. Nodes go to the graph being written:
the main graph, or a Loop body opened with ``body()``, which reads the main graph's values and
initializers by name (outer scope). Activations and sparse products hold their constants in
the model's dtype (``scalar``, ``constant``), so a float64 model exports double tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Reductions take their axes as an input from these opsets on (an attribute before).
AXES_INPUT_FROM = {"ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18, "ReduceMean": 18}
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_./:\-]")


class GraphWriter:
    """Names, initializers and nodes of one ONNX model being written (module docstring)."""

    def __init__(self, dtype: np.dtype, opset: int):
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.initializers: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._taken: set[str] = set()
        self._scalars: dict[tuple[str, float], str] = {}
        self.batch: str | None = None  # the (1,) int64 batch size N, once the inputs are read

    # ----------------------------------------------------------------------------- names
    def reserve(self, name: str) -> str:
        """Take ``name`` exactly (graph inputs and outputs keep the model's names)."""
        if name in self._taken:
            raise ValueError(f"the name {name!r} is used twice")
        self._taken.add(name)
        return name

    def fresh(self, hint: str) -> str:
        """A new unique name like ``hint`` (characters outside [A-Za-z0-9_./:-] become '_')."""
        base = _NAME_CHARACTERS.sub("_", hint) or "value"
        name, index = base, 1
        while name in self._taken:
            name, index = f"{base}_{index}", index + 1
        self._taken.add(name)
        return name

    # ----------------------------------------------------------------------------- constants
    def constant(self, array: Any, hint: str) -> str:
        """An initializer holding ``array`` as it is (its own dtype)."""
        name = self.fresh(hint)
        array = np.asarray(array)  # (np.ascontiguousarray would make a 0-d array 1-d)
        self.initializers.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def values(self, array: Any, hint: str) -> str:
        """An initializer holding ``array`` in the model's dtype."""
        return self.constant(np.asarray(array, dtype=self.dtype), hint)

    def scalar(self, value: float, dtype: Any = None) -> str:
        """A 0-d initializer (the model's dtype unless given), shared by every reader."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        key = (dtype.str, float(value))
        if key not in self._scalars:
            self._scalars[key] = self.constant(np.array(value, dtype=dtype), f"const_{dtype.name}_{value:g}")
        return self._scalars[key]

    def integers(self, values: Sequence[int], hint: str) -> str:
        """A 1-d int64 initializer (shapes, axes, pads, slice bounds)."""
        return self.constant(np.asarray(values, dtype=np.int64), hint)

    # ----------------------------------------------------------------------------- nodes
    def node(self, op: str, inputs: Sequence[str], hint: str, outputs: int = 1, **attributes: Any) -> Any:
        """Append a node; its output name (a list of them when ``outputs`` > 1)."""
        names = [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=names[0], **attributes))
        return names if outputs > 1 else names[0]

    def node_into(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None, **attributes: Any
    ) -> None:
        """Append a node writing the given (already reserved) names."""
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name or outputs[0], **attributes))

    @contextmanager
    def body(self) -> Iterator[list[onnx.NodeProto]]:
        """Write nodes into a new list (a Loop body) until the block ends; yields that list."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    # ----------------------------------------------------------------------------- op forms
    def reduce(self, op: str, x: str, axes: Sequence[int] | None, hint: str, keepdims: int = 0) -> str:
        """op (ReduceSum, ReduceMax, ...) over ``axes`` (None: all), as input or attribute."""
        if axes is None:
            return self.node(op, [x], hint, keepdims=keepdims)
        if self.opset >= AXES_INPUT_FROM[op]:
            return self.node(op, [x, self.integers(axes, "axes")], hint, keepdims=keepdims)
        return self.node(op, [x], hint, axes=list(axes), keepdims=keepdims)

    def columns(self, x: str, start: int, stop: int, hint: str, step: int = 1) -> str:
        """x[:, start:stop:step] of an (N, k) tensor."""
        bounds = [self.integers([start], "start"), self.integers([stop], "stop"), self.integers([1], "axis_1")]
        return self.node("Slice", [x, *bounds, self.integers([step], "step")], hint)

    def pad_columns(self, x: str, before: int, after: int, hint: str) -> str:
        """x (N, k) with ``before`` zero columns in front and ``after`` behind."""
        return self.node("Pad", [x, self.integers([0, before, 0, after], "pads")], hint)

    def batch_shape(self, *dims: int) -> str:
        """The (1 + len(dims),) int64 shape [N, *dims]."""
        if not dims:
            return self.batch
        return self.node("Concat", [self.batch, self.integers(list(dims), "dims")], "shape", axis=0)

    def filled(self, value: float, *dims: int, hint: str = "zeros") -> str:
        """An (N, *dims) tensor of ``value`` in the model's dtype."""
        fill = numpy_helper.from_array(np.array([value], dtype=self.dtype))
        return self.node("ConstantOfShape", [self.batch_shape(*dims)], hint, value=fill)

    def reshape(self, x: str, dims: Sequence[int], hint: str) -> str:
        """x reshaped to (N, *dims): 0 copies the batch size (no dimension of dims is 0)."""
        return self.node("Reshape", [x, self.integers([0, *dims], "shape")], hint)

    def tensor_info(self, name: str, dims: Sequence[Any], elem_type: int | None = None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, self.elem_type if elem_type is None else elem_type, list(dims))
