"""LayerNormalization, InstanceNormalization and GroupNormalization: per-sample statistics,
lowered exactly through square and rsqrt blocks.

Each op standardizes groups of k contiguous entries (in C order) of one sample, then applies a
constant elementwise scale and bias:

    op                    groups (per sample)               k
    LayerNormalization    prod(shape[:axis])                prod(shape[axis:])
    InstanceNormalization C  (of N, C, spatial...)          prod(spatial)
    GroupNormalization    num_groups                        C / num_groups * prod(spatial)

Per group of entries x_1..x_k:

    mu  = (1/k) sum x_j                 linear (kept as an identity state per group when
                                        folding it into every centred row would cost more
                                        non-zeros, ``FOLD_GROWTH_LIMIT``: one state saves k - 1
                                        non-zeros in each of 2k rows)
    c_j = x_j - mu                      linear
    q_j = c_j^2                         one ``square`` state per entry
    v   = (1/k) sum q_j                 linear (the centred form: no E[x^2] - E[x]^2 cancellation)
    r   = rsqrt(v + eps)                one ``rsqrt`` state per group
    c_j r = ((c_j/s + r s)^2 - q_j/s^2 - (r^2) s^2) / 2
                                        one ``square`` state per entry and one r^2 ``square``
                                        state per group: q_j is shared with the variance and
                                        r^2 by the group (the identity (a + b)^2 - (a - b)^2
                                        would need two squares per entry); s per entry is the
                                        exact power-of-two balancing of ``elementwise.product``
    y_j = scale_j (c_j r) + bias_j      linear (scale and bias constant)

States: 2k + 2 per group (+1 with a mean state), e.g. LayerNorm over 32 features: 66 per token.
The products balance c and r by their typical sizes at compile time (inputs count 1): in
float32, standardizing data whose spread is far from that (std 0.01 where 1 is assumed) loses
about log10(ratio^2) digits in the product, as any fixed balancing of the square identity does.

``stash_type`` (the precision of the statistics) is accepted for any value: the statistics
are computed in the model's precision (float64 models: more exactly than a float32 stash).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ...compose import balancing_scales
from ...errors import GraphError
from ..context import FOLD_GROWTH_LIMIT, LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, as_affine, normalize_axis, optional_input, require_constant


@dataclass(frozen=True)
class Standardized:
    """The standardized entries (x's shape) and the per-group statistics, each of shape (groups,)."""

    values: Affine
    mean: Affine
    inv_std: Affine


def standardize(ctx: LoweringContext, node: NodeView, x: Affine, groups: int, epsilon: float) -> Standardized:
    """(x - mu) / sqrt(var + eps) over ``groups`` contiguous groups of x's entries (C order)."""
    if groups < 1 or x.size % groups:
        raise GraphError(f"{node.where}: {x.size} entries do not split into {groups} equal groups")
    k = x.size // groups
    name = node.proto.output[0]
    flat = x.reshape((x.size,))
    mean = flat.map(_group_means(groups, k), (groups,))
    if _keep_mean_as_state(flat, k):
        mean = ctx.create_block(mean, "identity", name=f"{name}/mean")
    centred = flat.reshape((groups, k)) - _per_entry(mean, k)
    squares = ctx.create_block(centred, "square", name=f"{name}/centred_squared")
    variance = squares.reshape((x.size,)).map(_group_means(groups, k), (groups,))
    inv_std = ctx.create_block(variance.shift(epsilon), "rsqrt", name=f"{name}/inv_std")
    values = _product_with_shared_factor(ctx, centred, squares, inv_std, name)
    return Standardized(values.reshape(x.shape), mean, inv_std)


def _group_means(groups: int, k: int) -> sp.csr_array:
    """The (groups, groups * k) map averaging each group of k contiguous entries."""
    columns = np.arange(groups * k)
    return sp.csr_array((np.full(groups * k, 1.0 / k), columns, np.arange(0, groups * k + 1, k)))


def _per_entry(per_group: Affine, k: int) -> Affine:
    """A (groups,) expression repeated over the k entries of each group: (groups, k)."""
    return per_group.reshape((per_group.size, 1)).broadcast_to((per_group.size, k))


def _keep_mean_as_state(flat: Affine, k: int) -> bool:
    """Whether a state per group for the mean costs fewer non-zeros: the centred rows are read
    by two blocks (the variance's squares and the product's); folded, each holds the whole
    group's rows, kept each holds its own entry's and the mean state."""
    folded = 2 * k * flat.coefficients.nnz
    kept = flat.coefficients.nnz + 2 * (flat.coefficients.nnz + flat.size)
    return folded > FOLD_GROWTH_LIMIT * kept


def _product_with_shared_factor(ctx: LoweringContext, a: Affine, a_squared: Affine, b: Affine, name: str) -> Affine:
    """a * b for a of shape (groups, k) and b of shape (groups,) shared by each group, given the
    states a_squared = a^2: a b = ((a/s + b s)^2 - a^2/s^2 - b^2 s^2) / 2, exact, with s per entry
    the power of two balancing a/s and b s (``balancing_scales``; powers of two scale exactly).
    One square state per entry and one (b^2) per group."""
    groups, k = a.shape
    b_entries = _per_entry(b, k)
    scales = balancing_scales(ctx.row_sizes(a), ctx.row_sizes(b_entries)).reshape(a.shape)
    b_squared = ctx.create_block(b, "square", name=f"{name}/inv_std_squared")
    plus = ctx.create_block(a.scale(1.0 / scales) + b_entries.scale(scales), "square", name=f"{name}/sum_squared")
    both = plus - a_squared.scale(1.0 / scales**2) - _per_entry(b_squared, k).scale(scales**2)
    return both.scale(np.full(a.shape, 0.5))


def _constant_like(value, node: NodeView, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """A constant operand (scale, bias) broadcast to ``shape`` (unidirectional broadcasting)."""
    array = np.asarray(require_constant(value, node, what), dtype=np.float64)
    try:
        if np.broadcast_shapes(array.shape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise GraphError(
            f"{node.where}: {what} of shape {array.shape} does not broadcast to the input's shape {shape}"
        ) from None
    return np.broadcast_to(array, shape)


def _per_channel(value, node: NodeView, what: str, channels: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """A constant of ``count`` values (one per channel, or per group of channels) spread over the
    channel axis (axis 1) of ``shape``: each value repeated for channels / count channels."""
    array = np.asarray(require_constant(value, node, what), dtype=np.float64).ravel()
    if array.size != count:
        raise GraphError(f"{node.where}: {what} has {array.size} values, expected {count}")
    per_channel = np.repeat(array, channels // count)
    return per_channel.reshape((1, channels) + (1,) * (len(shape) - 2))


def _channels_input(ctx: LoweringContext, node: NodeView, value) -> Affine:
    x = as_affine(value, ctx.width)
    if x.ndim < 2:
        raise GraphError(f"{node.where}: expected an input of rank >= 2 (N, C, ...), got shape {x.shape}")
    return x


# ---------------------------------------------------------------------------------- the ops
@lowers("LayerNormalization", attributes=("axis", "epsilon", "stash_type"))
def lower_layer_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """scale * (x - mean) * rsqrt(var + eps) + bias over axes [axis, rank); Mean, InvStdDev too.

    Square and rsqrt blocks (``standardize``); the optional outputs are per sample."""
    x = as_affine(inputs[0], ctx.width)
    axis = normalize_axis(int(node.attr("axis", -1)), x.ndim, node)
    groups = int(np.prod(x.shape[:axis], dtype=np.int64))
    stats = standardize(ctx, node, x, groups, float(node.attr("epsilon", 1e-5)))
    scale = _constant_like(inputs[1], node, "Scale (input 1)", x.shape)
    y = stats.values.scale(scale)
    bias = optional_input(inputs, 2)
    if bias is not None:
        y = y.shift(_constant_like(bias, node, "B (input 2)", x.shape))
    reduced = x.shape[:axis] + (1,) * (x.ndim - axis)
    return [y, stats.mean.reshape(reduced), stats.inv_std.reshape(reduced)]


@lowers("InstanceNormalization", attributes=("epsilon", "consumed_inputs"))
def lower_instance_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """scale_c * (x - mean) * rsqrt(var + eps) + B_c per channel of each sample.

    Square and rsqrt blocks (``standardize``)."""
    x = _channels_input(ctx, node, inputs[0])
    channels = x.shape[1]
    stats = standardize(ctx, node, x, x.shape[0] * channels, float(node.attr("epsilon", 1e-5)))
    scale = _per_channel(inputs[1], node, "scale (input 1)", channels, channels, x.shape)
    bias = _per_channel(inputs[2], node, "B (input 2)", channels, channels, x.shape)
    return [stats.values.scale(np.broadcast_to(scale, x.shape)).shift(np.broadcast_to(bias, x.shape))]


@lowers("GroupNormalization", attributes=("epsilon", "num_groups", "stash_type"))
def lower_group_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """scale * (x - mean) * rsqrt(var + eps) + bias per group of channels (of each sample).

    Square and rsqrt blocks (``standardize``); scale and bias are per group at opset 18, per
    channel from 21."""
    x = _channels_input(ctx, node, inputs[0])
    channels = x.shape[1]
    num_groups = node.attr("num_groups")
    if num_groups is None:
        raise GraphError(f"{node.where}: the required attribute num_groups is missing")
    num_groups = int(num_groups)
    if num_groups < 1 or channels % num_groups:
        raise node.unsupported("num_groups", num_groups, f"it must be positive and divide the {channels} channels")
    stats = standardize(ctx, node, x, x.shape[0] * num_groups, float(node.attr("epsilon", 1e-5)))
    count = num_groups if node.opset < 21 else channels  # opset 18: one scale and bias per group
    what = "per group" if count == num_groups and node.opset < 21 else "per channel"
    scale = _per_channel(inputs[1], node, f"scale (input 1, {what})", channels, count, x.shape)
    bias = _per_channel(inputs[2], node, f"bias (input 2, {what})", channels, count, x.shape)
    return [stats.values.scale(np.broadcast_to(scale, x.shape)).shift(np.broadcast_to(bias, x.shape))]
