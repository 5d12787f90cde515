"""Estimating the size of a lowered model before building it.

The non-zeros of A, B, C, D are dominated by the linear layers; per sample (batch 1):

    Conv           prod(output shape) * C_in / groups * prod(kernel)   (its MAC count)
    ConvTranspose  prod(input shape) * C_out / groups * prod(kernel)
    Gemm / MatMul  rows of the output * the contracted dimension

Shapes come from ONNX shape inference (with data propagation, so exporter shape subgraphs
resolve). The estimate is an upper bound (padding taps are counted), checked against the memory
limit before any matrix is allocated; the lowering also checks its running count as it goes.
"""

from __future__ import annotations

import math
import os

import onnx

from ..errors import ModelTooLargeError
from .context import BYTES_PER_NONZERO_WHILE_LOWERING
from .graph import PreparedModel

FINAL_BYTES_PER_NONZERO = 12  # float64 value + int32 column index


def available_memory_bytes() -> float:
    """MemAvailable from /proc/meminfo, else the physical memory, else unlimited."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def estimate_nonzeros(prepared: PreparedModel) -> int:
    """Upper bound on the non-zeros of the lowered model's linear layers (0 where unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(prepared.model, data_prop=True)
    except Exception:  # inference is best effort; the running check in the lowering still holds
        return 0
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    total = 0
    for node in inferred.graph.node:
        total += _node_nonzeros(node, shapes)
    return total


def _node_nonzeros(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    inputs = [shapes.get(name) for name in node.input]
    output = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "Conv" and output and len(inputs) > 1 and inputs[1]:
        weight = inputs[1]  # (C_out, C_in / groups, k...)
        return math.prod(output) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose" and inputs and inputs[0] and len(inputs) > 1 and inputs[1]:
        weight = inputs[1]  # (C_in, C_out / groups, k...)
        return math.prod(inputs[0]) * math.prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul") and output and inputs and inputs[0]:
        contracted = inputs[0][-1] if node.op_type == "MatMul" or not _attribute(node, "transA") else inputs[0][0]
        return math.prod(output) * contracted
    return 0


def _attribute(node: onnx.NodeProto, name: str) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return 0


def check_model_fits(prepared: PreparedModel, limit_bytes: float) -> int:
    """Raise ModelTooLargeError, with the estimate, when the lowering cannot fit; else return it."""
    nonzeros = estimate_nonzeros(prepared)
    needed = nonzeros * BYTES_PER_NONZERO_WHILE_LOWERING
    if needed > limit_bytes:
        raise ModelTooLargeError(
            f"the lowered model would have about {nonzeros / 1e9:,.2f}G non-zeros "
            f"(~{nonzeros * FINAL_BYTES_PER_NONZERO / 1e9:,.1f} GB as float64 CSR, ~{needed / 1e9:,.1f} GB while "
            f"lowering), more than the {limit_bytes / 1e9:,.1f} GB available. Lower a smaller input resolution "
            "or a smaller network, or use a machine with more memory (memory_limit_bytes raises the limit)"
        )
    return nonzeros
