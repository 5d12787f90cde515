"""Refusing graphs that mix samples along the batch axis.

The model is lowered at batch size 1 and applied to each sample (``graph``'s batch convention).
That is exact only when the graph keeps samples apart: an op that reduces, reshapes, slices or
contracts across the batch axis, or reads the batch size itself (``x / Shape(x)[0]``), computes
something else at batch 3 than three runs at batch 1, and at batch 1 it cannot be seen. So before
lowering, ``check_batch_independence`` looks at the graph at two batch sizes.

Why this way (generic, from the ONNX graph) rather than a batch-axis rule in every op lowering:
the lowerings only ever see batch 1, where the batch axis is a size-1 axis like any other, and
a rule per lowering would have to be written (and kept right) for every op. Instead:

1. onnx shape inference (with data propagation; shape operands it cannot follow, such as
   ``Shape(x)[0] // 2``, are evaluated here and given back to it as constants) runs on the
   prepared graph with each dynamic batch axis set to 2, then to 3. A value computed from a
   batched input keeps the samples apart only if exactly one of its axes is 2, then 3, all
   others equal: that axis is its batch axis (it may move, e.g. through a Transpose). An
   output whose shape is the same at both sizes lost the batch axis (a reduction over it,
   Gather of one sample); one that changes otherwise merged it with other axes or changed its
   length (Flatten(axis=0), a Reshape to (-1,), a Concat, Pad or Tile along it).
2. Ops that keep the batch axis's size but still combine along it are named: a reduction over
   it, a contraction over it (MatMul, Gemm), convolution, pooling and the per-sample ops with a
   fixed sample axis (Conv reads axis 0 as N, RNNs axis 1 or 0), a reversing Slice.
3. Shape and Size of a batched value are evaluated (with the reference, like constant folding)
   at both batch sizes; a constant that differs is batch-size dependent. It may only feed the
   shape operand of a shape op (Reshape's shape, Expand, Tile, Slice, Pad...), whose effect is
   on the output's shape and so checked by 1.; anywhere else (``x / Shape(x)[0]``) the batch
   size would be read as a number, which the lowering fixes at 1. A constant that only repeats
   one slice along a batch axis (``ConstantOfShape(Shape(x))``, an RNN's zero initial state) is
   the same for every sample and may be read anywhere.

Batch axes merged with others (attention's reshapes) are followed where each sample's values stay
one block (``merged``). The modules: ``shapes`` (1., the inference), ``walk`` (the pass over the
nodes), ``merged``, ``rules`` (2.), ``sized`` (3.).

Only inputs whose batch axis the model leaves dynamic are checked: a model declaring a static
batch of 1 is defined for one sample only and applying it per sample is its meaning. So is a
graph that does not run at other batch sizes after the offending node (a Reshape to one
sample's size, or to ``[1, -1]`` then a Gemm one sample wide, as some exporters write even with
a dynamic N): onnxruntime refuses a batch there, so nothing is silently wrong, and it is not
refused. Where shape inference cannot give a shape, that value is not checked here; ``verify``
runs a real batch through onnxruntime and catches what slips past.
"""

from __future__ import annotations

import numpy as np

from ..graph import PreparedModel
from .shapes import BATCH_SIZES, _inferred_shapes
from .walk import _Walk

__all__ = ["check_batch_independence"]

# onnx's data propagation gives up on much shape arithmetic (even an Identity): the shape
# operands it could not follow are evaluated here and handed back to shape inference as
# constants, at most this many times.
MAX_INFERENCE_ROUNDS = 3


def check_batch_independence(prepared: PreparedModel) -> None:
    """Raise GraphError or UnsupportedAttributeError at the first node that mixes samples."""
    batched_inputs = [i for i in prepared.inputs if i.batch_dynamic]
    if not batched_inputs:
        return
    names = {i.name for i in batched_inputs}
    known: list[dict[str, np.ndarray]] = [{} for _ in BATCH_SIZES]
    for round_ in range(MAX_INFERENCE_ROUNDS):
        shapes = [_inferred_shapes(prepared, size, values) for size, values in zip(BATCH_SIZES, known)]
        walk = _Walk(prepared, shapes, names, pending=True)
        walk.run()
        found = walk.shape_operand_values()
        if round_ == MAX_INFERENCE_ROUNDS - 1 or all(set(new) <= set(old) for new, old in zip(found, known)):
            _Walk(prepared, shapes, names).run()
            return
        known = [{**old, **new} for old, new in zip(known, found)]
