"""Softmax and LogSoftmax along any axis: exact and numerically stable, without products.

The elements normalized together form a row z_1, ..., z_K: from opset 13 the K values along
``axis`` (default -1) at each position of the other axes; before (opsets 1 and 11) the input
coerced to 2-D at ``axis`` (default 1): a row is everything from ``axis`` on, K = the product of
those dimensions. Per row:

    m      = max_j z_j                  the relu tree of MaxPool (``pooling.tree_max``):
                                        K - 1 relu states, exact
    e_j    = exp(z_j - m)               one exp block, K states; every argument is <= 0
    L      = log(sum_j e_j)             one log block, 1 state; its argument lies in [1, K]
                                        (the maximum's own term is exp(0) = 1)
    LogSoftmax(z)_j = z_j - m - L       affine in the states: nothing more
    Softmax(z)_j    = exp(z_j - m - L)  one more exp block, K states; argument <= 0

States per row: 2K for LogSoftmax, 3K for Softmax (+ 1 when m, + K when z, is kept as its own
block: see Sharing).
Every exp argument is <= 0 (up to rounding) and every log argument in [1, K], whatever the
logits: no phi is ever evaluated where it overflows, underflows to a zero that log then meets,
or loses its relative precision, so logits of 1e3 (float64) or 80 (float32) give no inf or NaN.
In float32 an exp argument z_j - m - L is rounded once per term, an error of about
eps (|z_j| + |m| + |L|): a relative error of 2 * 6e-8 * 80 ~ 1e-5 at logits of 80, inside
verify's 1e-4 (and onnxruntime rounds the same differences).

Why Softmax as exp(z - m - L) and not exp(z - m) * reciprocal(sum_j e_j): the latter is a
product of two variables, lowered by the square identity: a reciprocal state per row and two
square states per element, 4K states per row instead of 3K, and the two squares' cancellation
costs precision that the single exp does not.

Why the maximum. Softmax is shift invariant: any c in place of m gives the same values as long
as exp(z_j - c) does not overflow and sum_j exp(z_j - c) does not underflow to 0. The row's mean
(linear: no state) keeps the sum >= 1 (the maximum is >= the mean) but overflows as soon as
max - mean passes ~88 in float32 (exp(89) is inf there; the e_j are stored in the model's dtype)
or ~709 in float64: logits of 1e3 do. Only a c within ~80 of every row's maximum is safe for
every input, and the maximum is the cheapest such c: a relu tree over n values takes n - 1
states however they are grouped, so one maximum over a larger window (a head's S x S scores)
costs as many states as the rows' own, and it does not bound a row's sum from below (a row far
below the window's maximum underflows to 0, and log gives -inf). So the tree stays, at (K - 1)
of the 3K states per row of Softmax.

Sharing. z's rows are read by the tree (about twice per element, see ``tree_max``) and by each
exp block, and m's row (the tree's top: a leaf plus a relu per level) by all K elements of each
exp block. Each is kept as an identity block, as ``LoweringContext.apply_map`` does for linear
maps, when copying its rows would cost more than ``FOLD_GROWTH_LIMIT`` times keeping it (a
selection of states, e.g. z straight from an input or an activation, is never kept again).

Sizes. A product of the output with another variable (attention's P V) balances its operands
by their typical sizes (``ops.elementwise.product``). An exp state whose row has size s would be
taken to be exp(s), but these arguments are <= 0: the exp states are given the size 1 and the
log state log K, its largest value (with exp(s), P was overestimated by orders of magnitude and
P V's square identity lost every float32 digit, even at unit-scale scores).

Softmax over the batch axis mixes samples and is refused before lowering (``batch_axis``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ..context import FOLD_GROWTH_LIMIT, LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, as_affine, normalize_axis
from .pooling import tree_max

# Rows of z read by the max tree per element: the first level's differences, then the values
# carried up the levels (see ``pooling._keep_if_costly``).
TREE_READS = 2


def rows_of(node: NodeView, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The (rows, K) table of the flat ids normalized together, and the shape of one value per
    row (the input's shape with the row's axes set to 1), in the order of the table's rows."""
    rank = len(shape)
    ids = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    if node.opset >= 13:
        axis = normalize_axis(int(node.attr("axis", -1)), rank, node)
        reduced = tuple(1 if a == axis else n for a, n in enumerate(shape))
        return np.moveaxis(ids, axis, -1).reshape(-1, shape[axis]), reduced
    axis = normalize_axis(int(node.attr("axis", 1)), rank, node)  # coerced to 2-D at axis
    reduced = shape[:axis] + (1,) * (rank - axis)
    return ids.reshape(math.prod(shape[:axis]), -1), reduced


def _shared(ctx: LoweringContext, value: Affine, reads: int, name: str) -> Affine:
    """``value``, or an identity block of it when its rows, read ``reads`` times each, would cost
    more than ``FOLD_GROWTH_LIMIT`` times keeping it (its rows once, then one entry per read)."""
    if value.is_selection:
        return value
    copied = reads * value.coefficients.nnz
    kept = value.coefficients.nnz + reads * value.size
    return ctx.materialize(value, name=name) if copied > FOLD_GROWTH_LIMIT * kept else value


def normalized_logits(ctx: LoweringContext, node: NodeView, z: Affine, exp_blocks: int) -> Affine:
    """z - m - log(sum exp(z - m)) per row (LogSoftmax), as an expression of z's shape.

    ``exp_blocks``: the exp blocks that will read it (1 here, 2 when Softmax adds its own), to
    decide which of z and m to keep as identity blocks."""
    out = node.proto.output[0]
    table, reduced = rows_of(node, z.shape)
    width = table.shape[1]
    z = _shared(ctx, z, TREE_READS + exp_blocks, f"{out}/logits")
    maximum = tree_max(ctx, z, table, out)
    maximum = _shared(ctx, maximum, exp_blocks * width, f"{out}/max").reshape(reduced)
    shifted = z - maximum.broadcast_to(z.shape)
    exponentials = ctx.create_block(shifted, "exp", name=f"{out}/exp", known_size=1.0)
    sums = sp.csr_array(
        (np.ones(table.size), table.ravel(), np.arange(0, table.size + 1, width)), shape=(table.shape[0], z.size)
    )
    sum_of_exponentials = exponentials.map(sums, reduced)
    log_sum = ctx.create_block(sum_of_exponentials, "log", name=f"{out}/log_sum", known_size=math.log(width))
    return shifted - log_sum.broadcast_to(z.shape)


def _one_element_rows(node: NodeView, shape: tuple[int, ...]) -> bool:
    """Rows of one element (or none): Softmax is 1 and LogSoftmax 0 there, whatever the input."""
    table, _ = rows_of(node, shape)
    return table.size == 0 or table.shape[1] == 1


@lowers("LogSoftmax", attributes=("axis",))
def lower_log_softmax(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """z - m - log(sum exp(z - m)), m the relu tree's maximum: exp and log blocks, no product."""
    z = as_affine(inputs[0], ctx.width)
    if _one_element_rows(node, z.shape):
        return [np.zeros(z.shape)]
    return [normalized_logits(ctx, node, z, exp_blocks=1)]


@lowers("Softmax", attributes=("axis",))
def lower_softmax(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """exp(z - m - log(sum exp(z - m))), m the relu tree's maximum: exp and log blocks, no product."""
    z = as_affine(inputs[0], ctx.width)
    if _one_element_rows(node, z.shape):
        return [np.ones(z.shape)]
    return [ctx.create_block(normalized_logits(ctx, node, z, exp_blocks=2), "exp", known_size=1.0)]
