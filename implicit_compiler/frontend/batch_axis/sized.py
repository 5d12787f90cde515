"""The constants computed from the batch size (step 3 of ``batch_axis``): Shape and Size of a
batched value evaluated at each batch size and followed through the constant nodes that read them."""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import NodeView
from ..fold import evaluate_constant_node
from .shapes import BATCH_SIZES, _merged_axis_of

# A third batch size at which the constants read from the batch size are also evaluated (from the
# shapes at 2 and 3, without inference): one the same at 2 and 3 but not at this size
# (``Shape(x)[0] // 2``) depends on the batch size in a way the two sizes do not show.
PROBE_SIZE = 5


class _SizedConstants:
    """Tracking the constants that depend on the batch size (``sized``, ``per_sample``, ``derived``,
    ``probes``) and folding the others (``constants``), for ``walk._Walk``."""

    def _read_sizes(self, node: NodeView) -> None:
        """Shape or Size of a batched value: its result at each batch size."""
        results = []
        for shapes in self.shapes:
            shape = shapes.get(node.proto.input[0])
            if shape is None:
                return  # unknown shape: nothing to track (verify still runs a batch)
            results.append(evaluate_constant_node(node, [np.zeros(shape, dtype=np.float64)])[0])
        found = _merged_axis_of(*(shapes.get(node.proto.input[0]) for shapes in self.shapes))
        if found is not None:
            probe = list(self.shapes[0][node.proto.input[0]])
            probe[found[0]] = found[1] * PROBE_SIZE
            self.probes[node.proto.output[0]] = evaluate_constant_node(node, [np.zeros(probe, dtype=np.float64)])[0]
        self._record(node.proto.output[0], results)

    def _propagate_sizes(self, node: NodeView) -> None:
        """A constant node reading a batch-size dependent constant: evaluate it at each size."""
        per_size: list[list[np.ndarray]] = []
        for index in range(len(BATCH_SIZES)):
            inputs = [
                self.sized[name][index] if name in self.sized else (self._constant(name) if name else None)
                for name in node.proto.input
            ]
            if any(value is None for name, value in zip(node.proto.input, inputs) if name):
                return
            if not any(name in self.sized for name in node.proto.input):
                try:  # only constants the same at both sizes: followed to mark what they give
                    per_size.append(evaluate_constant_node(node, inputs))
                except GraphError:
                    return
                continue
            per_size.append(evaluate_constant_node(node, inputs))
        self._propagate_probe(node)
        for position, name in enumerate(node.proto.output):
            if name:
                self._record(name, [values[position] for values in per_size])

    def _propagate_probe(self, node: NodeView) -> None:
        """The node's outputs at PROBE_SIZE, where every operand read from the batch size has one."""
        names = node.proto.input
        if not all(name in self.probes for name in names if name in self.sized or name in self.derived):
            return
        inputs = [
            self.probes[name] if name in self.probes else (self._constant(name) if name else None) for name in names
        ]
        try:
            values = evaluate_constant_node(node, inputs)
        except GraphError:  # (e.g. shape arithmetic that only fits the sizes inferred)
            return
        for name, value in zip(node.proto.output, values):
            if name:
                self.probes[name] = value

    def _record(self, name: str, values: list[np.ndarray]) -> None:
        """Keep a constant that differs between the batch sizes; one that only repeats the same
        slice along a batch axis (``ConstantOfShape(Shape(x))``, an RNN's zero initial state) is
        the same for every sample, so it may be read anywhere (its shape is checked as a value's)."""
        first, second = values
        if first.shape == second.shape and np.array_equal(first, second):
            self.constants[name] = first
            probe = self.probes.get(name)
            if probe is None or probe.shape != first.shape or not np.array_equal(probe, first):
                self.derived.add(name)
            return
        self.sized[name] = values
        axis = self._batch_axis_of(first.shape, second.shape)
        if (
            axis is not None
            and all(_repeats_along(value, axis) for value in values)
            and np.array_equal(np.take(first, [0], axis), np.take(second, [0], axis))
        ):
            self.per_sample.add(name)

    def reads_batch_size(self, name: str) -> bool:
        """A constant computed from the batch size that is not the same for every sample."""
        return name in self.sized and name not in self.per_sample

    def _constant(self, name: str) -> np.ndarray | None:
        """The value of a constant not depending on the batch size (folded on demand), or None."""
        if name in self.constants:
            return self.constants[name]
        self.constants[name] = None  # a guard against cycles and values that are not constants
        index = self.producers.get(name)
        if index is None:
            return None
        proto = self.prepared.graph.node[index]
        if any(n in self.batched or n in self.sized for n in proto.input):
            return None
        inputs = [self._constant(n) if n else None for n in proto.input]
        if any(value is None for n, value in zip(proto.input, inputs) if n):
            return None
        try:
            values = evaluate_constant_node(NodeView(proto, self.prepared.opset, index), inputs)
        except GraphError:
            return None
        for out, value in zip(proto.output, values):
            if out:
                self.constants[out] = value
        return self.constants[name]

    @staticmethod
    def _batch_axis_of(before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
        if len(before) != len(after):
            return None
        changed = [axis for axis, (b, a) in enumerate(zip(before, after)) if b != a]
        if len(changed) == 1 and (before[changed[0]], after[changed[0]]) == BATCH_SIZES:
            return changed[0]
        return None


def _repeats_along(value: np.ndarray, axis: int) -> bool:
    """Every slice along ``axis`` equals the first."""
    return bool(np.all(value == np.take(value, [0], axis)))
