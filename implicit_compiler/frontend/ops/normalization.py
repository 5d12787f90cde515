"""BatchNormalization in inference mode: a per-channel affine map (no state).

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta
      = s * x + (beta - s * mean),   s = gamma / sqrt(var + epsilon),   per channel (axis 1)

Training mode depends on batch statistics and is refused (``check_inference_mode``, run on
every node before any is lowered). How a model asks for it depends on the opset: below 7 by
``is_test=0``, the default; from 7 to 13 by naming outputs beyond Y (the running or saved
statistics); from 14 by ``training_mode=1`` (outputs beyond Y then only exist in training mode).
"""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import LoweringContext, NodeView
from ..registry import lowers
from .common import as_affine, require_constant

ATTRIBUTES = ("epsilon", "momentum", "training_mode", "spatial", "is_test", "consumed_inputs")


def check_inference_mode(node: NodeView) -> None:
    """Refuse a BatchNormalization node in training mode (batch statistics: not a per-sample map)."""
    remedy = "training-mode batch statistics are not a per-sample function: export the model in eval mode"
    if node.attr("training_mode", 0):
        raise node.unsupported("training_mode", 1, remedy)
    if node.opset < 7 and not node.attr("is_test", 0):
        raise node.unsupported(
            "is_test", node.attr("is_test", 0), f"{remedy} (is_test=1; below opset 7 its default, 0, means training)"
        )
    if len([name for name in node.proto.output if name]) > 1:
        raise GraphError(
            f"{node.where}: it names the running or saved mean/variance outputs, which only exist in training "
            "mode; export the model in eval mode"
        )
    if node.opset < 7 and node.attr("spatial", 1) == 0:
        raise node.unsupported("spatial", 0, "per-activation statistics are not supported; upgrade the model")


@lowers("BatchNormalization", attributes=ATTRIBUTES, check=check_inference_mode)
def lower_batch_normalization(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """s * x + (beta - s * mean) per channel, s = gamma / sqrt(var + eps)."""
    x = as_affine(inputs[0], ctx.width)
    names = ("scale (input 1)", "bias (input 2)", "mean (input 3)", "var (input 4)")
    gamma, beta, mean, var = (
        np.asarray(require_constant(value, node, name), dtype=np.float64) for value, name in zip(inputs[1:5], names)
    )
    if x.ndim < 2:
        raise GraphError(f"{node.where}: expected an input of rank >= 2 (N, C, ...), got shape {x.shape}")
    channels = x.shape[1]
    for name, array in zip(names, (gamma, beta, mean, var)):
        if array.size != channels:
            raise GraphError(f"{node.where}: {name} has {array.size} values, expected one per channel ({channels})")
    epsilon = float(node.attr("epsilon", 1e-5))
    scale = gamma.ravel() / np.sqrt(var.ravel() + epsilon)
    shift = beta.ravel() - scale * mean.ravel()
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    return [x.scale(scale.reshape(per_channel)).shift(shift.reshape(per_channel))]
