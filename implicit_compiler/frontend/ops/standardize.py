"""LayerNormalization, InstanceNormalization and GroupNormalization: per-sample statistics,
lowered exactly through square, log and exp blocks.

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
                                        non-zeros in each of 3k rows)
    c_j = x_j - mu                      linear (kept as an identity state per entry when its
                                        rows are long, ``FOLD_GROWTH_LIMIT``: three blocks read
                                        them, e.g. a transformer's residual stream)
    q_j = c_j^2                         one ``square`` state per entry
    v   = (1/k) sum q_j                 linear (the centred form: no E[x^2] - E[x]^2 cancellation)
    l   = log(v + eps)                  one ``log`` state per group; L = -l/2 = log rsqrt(v + eps)
    p_j = log+(c_j), n_j = log+(-c_j)   two ``log_positive`` states per entry,
                                        log+(z) = log(max(z, f)), f = 2**-1022
    c_j r = exp(p_j + L) - exp(n_j + L) two ``exp`` states per entry
    y_j = scale_j (c_j r) + bias_j      linear (scale and bias constant)

with r = rsqrt(v + eps). For c_j > 0 the first exp is c_j r and the second f r (and the other
way round for c_j < 0; both f r at c_j = 0): the absolute error is at most f r <= 2**-1022 /
sqrt(eps), below anything float32 or float64 can hold next to a standardized value of size ~1
(with eps = 0, f / std: as negligible unless the std itself is below about 1e-290).

States: 5k + 1 per group (+1 with a mean state, +k with centred states; +1, an rsqrt, where
LayerNormalization's InvStdDev output is used), e.g. LayerNorm over 32 features: 161 per token
(162 with the mean state). Through the square identity, c_j r = ((c_j/s + r s)^2 - q_j/s^2 -
r^2 s^2) / 2 with s fixed at compile time, it was 2k + 2 (66). The zoo's ViT (5 LayerNorms of 16
tokens x 32): n 87,440 -> 95,552, nnz(A) 864k -> 804k (its residual stream's centred rows, of
up to 193 non-zeros, are now kept once as states instead of folded into the blocks reading
them), float32 max abs error in verify 8.0e-6 -> 2.4e-6.

Precision: the product is formed in the log domain, so its relative error does not depend on
the spread of the data. In float32, log c_j and L are rounded to about eps_32 |log c_j| and
eps_32 |L| absolutely, their sum to eps_32 |log c_j + L|, and exp turns these into relative
errors: about eps_32 (|log c_j| + |L|) per entry (1e-6 at std 0.01 or 100), whatever the std.
The square identity's fixed balancing (sizes 1 and 1) lost about log10(std^-2) digits at std
0.01 (four: 10x over verify's float32 tolerance), and at a constant group (c = 0, r =
eps^-1/2) did not give 0. What remains is the float32 rounding of the mean itself, which
shifts every c_j of a group alike: about eps_32 |mean| times a small multiple of sqrt(k)
absolutely. At mean 100 and std 1, GroupNorm over k = 128 entries exceeds verify's tolerance
against the exact result by up to 1.5x on about 4 random draws in 10, as it did before
(onnxruntime's own GroupNormalization: 15x, on every draw); LayerNorm over 32, rarely.

``stash_type`` (the precision of the statistics) is accepted for any value: the statistics
are computed in the model's precision (float64 models: more exactly than a float32 stash).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ..context import FOLD_GROWTH_LIMIT, LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, as_affine, normalize_axis, optional_input, require_constant


@dataclass(frozen=True)
class Standardized:
    """The standardized entries (x's shape) and the per-group statistics, each of shape (groups,)."""

    values: Affine
    mean: Affine
    inv_std: Affine | None


def standardize(
    ctx: LoweringContext, node: NodeView, x: Affine, groups: int, epsilon: float, inv_std: bool = False
) -> Standardized:
    """(x - mu) / sqrt(var + eps) over ``groups`` contiguous groups of x's entries (C order), in
    the log domain (the module's docstring); ``inv_std``: also rsqrt(var + eps), one state per
    group (LayerNormalization's optional output; None otherwise)."""
    if groups < 1 or x.size % groups:
        raise GraphError(f"{node.where}: {x.size} entries do not split into {groups} equal groups")
    k = x.size // groups
    name = node.proto.output[0]
    flat = x.reshape((x.size,))
    mean = flat.map(_group_means(groups, k), (groups,))
    if _keep_mean_as_state(flat, k):
        mean = ctx.create_block(mean, "identity", name=f"{name}/mean")
    centred = flat.reshape((groups, k)) - _per_entry(mean, k)
    if _keep_centred_as_states(centred):
        centred = ctx.create_block(centred, "identity", name=f"{name}/centred")
    squares = ctx.create_block(centred, "square", name=f"{name}/centred_squared")
    variance = squares.reshape((x.size,)).map(_group_means(groups, k), (groups,)).shift(epsilon)
    log_variance = ctx.create_block(variance, "log", name=f"{name}/log_variance")
    values = _scaled_by_exp(ctx, centred, log_variance.scale(np.full(groups, -0.5)), name)
    root = ctx.create_block(variance, "rsqrt", name=f"{name}/inv_std") if inv_std else None
    return Standardized(values.reshape(x.shape), mean, root)


def _group_means(groups: int, k: int) -> sp.csr_array:
    """The (groups, groups * k) map averaging each group of k contiguous entries."""
    columns = np.arange(groups * k)
    return sp.csr_array((np.full(groups * k, 1.0 / k), columns, np.arange(0, groups * k + 1, k)))


def _per_entry(per_group: Affine, k: int) -> Affine:
    """A (groups,) expression repeated over the k entries of each group: (groups, k)."""
    return per_group.reshape((per_group.size, 1)).broadcast_to((per_group.size, k))


def _keep_mean_as_state(flat: Affine, k: int) -> bool:
    """Whether a state per group for the mean costs fewer non-zeros: the centred rows are read
    by three blocks (the variance's squares and the two log_positive blocks); folded, each
    holds the whole group's rows, kept each holds its own entry's and the mean state."""
    folded = 3 * k * flat.coefficients.nnz
    kept = flat.coefficients.nnz + 3 * (flat.coefficients.nnz + flat.size)
    return folded > FOLD_GROWTH_LIMIT * kept


def _keep_centred_as_states(centred: Affine) -> bool:
    """Whether an identity state per entry for c_j costs fewer non-zeros: three blocks read the
    centred rows (the squares and the two log_positive blocks), each a copy of them when folded;
    kept, one copy and three reads of one state. (A residual stream's rows hold hundreds.)"""
    folded = 3 * centred.coefficients.nnz
    kept = centred.coefficients.nnz + 3 * centred.size
    return folded > FOLD_GROWTH_LIMIT * kept


def _scaled_by_exp(ctx: LoweringContext, a: Affine, log_b: Affine, name: str) -> Affine:
    """a * exp(log_b) for a of shape (groups, k) and log_b of shape (groups,) shared by each
    group: exp(log+(a) + log_b) - exp(log+(-a) + log_b), two log_positive and two exp states
    per entry. Relative error about eps (|log a| + |log_b|), whatever the sizes of a and b
    (the square identity's fixed balancing lost digits when they strayed from the estimate)."""
    k = a.shape[1]
    log_b = _per_entry(log_b, k)
    parts = []
    for sign, part in ((1.0, "positive"), (-1.0, "negative")):
        log_part = ctx.create_block(a.scale(np.full(a.shape, sign)), "log_positive", name=f"{name}/log_{part}")
        parts.append(ctx.create_block(log_part + log_b, "exp", name=f"{name}/{part}_standardized"))
    return parts[0] - parts[1]


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

    Square, log, log_positive and exp blocks (``standardize``); the optional outputs are per
    sample, InvStdDev one rsqrt state per group, made only when the node names that output."""
    x = as_affine(inputs[0], ctx.width)
    axis = normalize_axis(int(node.attr("axis", -1)), x.ndim, node)
    groups = int(np.prod(x.shape[:axis], dtype=np.int64))
    inv_std = len(node.proto.output) > 2 and bool(node.proto.output[2])
    stats = standardize(ctx, node, x, groups, float(node.attr("epsilon", 1e-5)), inv_std)
    scale = _constant_like(inputs[1], node, "Scale (input 1)", x.shape)
    y = stats.values.scale(scale)
    bias = optional_input(inputs, 2)
    if bias is not None:
        y = y.shift(_constant_like(bias, node, "B (input 2)", x.shape))
    reduced = x.shape[:axis] + (1,) * (x.ndim - axis)
    outputs = [y, stats.mean.reshape(reduced)]
    return outputs + ([stats.inv_std.reshape(reduced)] if inv_std else [])


@lowers("InstanceNormalization", attributes=("epsilon", "consumed_inputs"))
def lower_instance_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """scale_c * (x - mean) * rsqrt(var + eps) + B_c per channel of each sample.

    Square, log, log_positive and exp blocks (``standardize``)."""
    x = _channels_input(ctx, node, inputs[0])
    channels = x.shape[1]
    stats = standardize(ctx, node, x, x.shape[0] * channels, float(node.attr("epsilon", 1e-5)))
    scale = _per_channel(inputs[1], node, "scale (input 1)", channels, channels, x.shape)
    bias = _per_channel(inputs[2], node, "B (input 2)", channels, channels, x.shape)
    return [stats.values.scale(np.broadcast_to(scale, x.shape)).shift(np.broadcast_to(bias, x.shape))]


@lowers("GroupNormalization", attributes=("epsilon", "num_groups", "stash_type"))
def lower_group_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """scale * (x - mean) * rsqrt(var + eps) + bias per group of channels (of each sample).

    Square, log, log_positive and exp blocks (``standardize``); scale and bias are per group at opset 18, per
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
