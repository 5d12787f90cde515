"""Following a batch axis merged with other axes (``_MergedAxes``, a part of ``walk._Walk``).

Attention as torch exports it reshapes (S, N, E) to (S, N * heads, d) and
(S, N, heads, d) to (S * N, E): the batch axis becomes one factor of a merged axis of size
``outer * N * inner`` (``outer``, ``inner`` fixed; both shapes give its size 2k, then 3k). In
row-major order a value whose batch factor sits there is laid out as (P, N, Q) (P: every index
before the factor, Q: every index after it), so sample n's values are the same P x Q block at
every batch size, and a Reshape (Flatten, Squeeze, Unsqueeze) that keeps the row-major order keeps
that block exactly when its output splits into the same (P, N, Q) around one axis: that axis then
holds the batch as (P / before, N, Q / after). Per sample this is what the batch-1 lowering
computes, so such a merge is followed (its ``outer``, ``inner`` recorded), through the ops in
``SLICEWISE`` (which treat every index of a batch-like axis alone: elementwise ops, MatMul and Gemm
not contracting it, Softmax, reductions and LayerNormalization over other axes, Transpose, Gather
and Slice along other axes), until a Reshape splits it back to a batch axis of its own. Anything
else reading a merged axis is refused, as is a graph output with one, or a merging Reshape whose
target is computed from the batch size yet the same at both sizes (``Shape(x)[0] // 2``, which
the two sizes cannot tell apart from a constant).
"""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import NodeView
from .rules import REORDERS_NOTHING, SLICEWISE


class _MergedAxes:
    """Following batch axes merged with other axes (``layouts``: each such value's (outer, inner)
    sizes around its batch factor; ``merged_by``: the node that merged it), for ``walk._Walk``."""

    def _output_layout(self, node: NodeView, name: str, found: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (outer, inner) sizes around the batch factor of the output's batch axis ((1, 1): an
        axis of its own), or None where the node is not known to keep every sample's block whole."""
        if found is None:
            return None
        axis, k = found
        if node.op_type in REORDERS_NOTHING:
            layout = self._reshaped_layout(node, name, axis)
        else:
            layouts = {self.layout(n) for n in node.proto.input if n in self.batched}
            known = layouts - {None}
            if len(known) > 1 or (None in layouts and known - {(1, 1)}):
                return None  # operands merged differently (or not known): their indices do not line up
            layout = known.pop() if known else (1, 1)
        if layout is None or layout[0] * layout[1] != k:
            return None
        if layout != (1, 1) and any(output.name == name for output in self.prepared.graph.output):
            return None  # the graph's output would not have the (N, ...) shape the compiled model gives
        return layout

    def _reshaped_layout(self, node: NodeView, name: str, axis: int) -> tuple[int, int] | None:
        """Where a row-major-order-keeping op puts the batch factor (see the module docstring): the
        input is (P, N, Q) in row-major order; the output must be (P, N, Q) around ``axis``."""
        source = node.proto.input[0]
        shape, out_shape = self.shapes[0].get(source), self.shapes[0].get(name)
        source_axis, layout = self.batch_axis(source), self.layout(source)
        if shape is None or source_axis is None or layout is None or out_shape is None:
            return (1, 1)  # not known: only an output with a batch axis of its own is taken
        outer, inner = layout
        prefix = int(np.prod(shape[:source_axis], dtype=np.int64)) * outer
        suffix = inner * int(np.prod(shape[source_axis + 1 :], dtype=np.int64))
        before = int(np.prod(out_shape[:axis], dtype=np.int64))
        after = int(np.prod(out_shape[axis + 1 :], dtype=np.int64))
        if prefix % before or suffix % after:
            return None
        result = (prefix // before, suffix // after)
        if (layout != (1, 1) or result != (1, 1)) and node.op_type == "Reshape":
            target = node.proto.input[1] if len(node.proto.input) > 1 else ""
            if target in self.derived:
                return None  # read from the batch size yet the same at both: not known at others
        return result

    def _check_merged_operands(self, node: NodeView, axes: dict[str, int | None]) -> None:
        """A merged batch axis may only reach the ops known to keep its slices apart."""
        if node.op_type in SLICEWISE or node.op_type in REORDERS_NOTHING:
            return
        for name, axis in axes.items():
            if name in self.layouts:
                outer, inner = self.layouts[name]
                raise GraphError(
                    f"{node.where}: the batch axis of operand {name!r} is merged with other axes (axis {axis}, "
                    f"{outer} x N x {inner} values, merged at {self.merged_by.get(name)}) and {node.op_type} is "
                    "not known to keep the slices of such an axis apart, so samples could mix. Split the batch "
                    "axis back out (a Reshape to (N, ...)) before this op; or, for a model meant for one "
                    "sample, declare a static batch of 1"
                )

    def layout(self, name: str) -> tuple[int, int] | None:
        """A batched value's (outer, inner) around its batch factor, None where its shapes are unknown."""
        if self.batch_axis(name) is None:
            return None
        return self.layouts.get(name, (1, 1))
