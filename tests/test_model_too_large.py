"""ResNet-50 at 224 x 224: ~4G non-zeros as CSR, refused from its estimate before allocating
(``structure="csr"``); structured (the default) it is its 25M weights and 11.4M states, and it
compiles."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import implicit_compiler as ic
from implicit_compiler.frontend.estimate import estimate_nonzeros
from implicit_compiler.frontend.graph import prepare
from implicit_compiler.structure import Dense


def _resnet50() -> onnx.ModelProto:
    """ResNet-50 v1.5 (bottlenecks 3-4-6-3, stride in the 3x3 conv) with zero weights."""
    nodes, weights = [], []
    counter = iter(range(1000))

    def conv(x, c_in, c_out, k, stride=1, relu=True):
        name = f"conv{next(counter)}"
        weights.append(numpy_helper.from_array(np.zeros((c_out, c_in, k, k), np.float32), f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], strides=[stride] * 2, pads=[k // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.r"]))
        return f"{name}.r"

    x = conv("image", 3, 64, 7, stride=2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, c_in = "pool", 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            h = conv(x, c_in, width, 1)
            h = conv(h, width, width, 3, stride=stride)
            h = conv(h, width, 4 * width, 1, relu=False)
            shortcut = conv(x, c_in, 4 * width, 1, stride=stride, relu=False) if block == 0 else x
            out = f"add{next(counter)}"
            nodes += [helper.make_node("Add", [h, shortcut], [out]), helper.make_node("Relu", [out], [f"{out}.r"])]
            x, c_in = f"{out}.r", 4 * width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    weights.append(numpy_helper.from_array(np.zeros((1000, 2048), np.float32), "fc.w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "resnet50", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], weights,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
def test_resnet50_at_224_as_csr_is_refused_with_its_estimate():
    model = _resnet50()
    with pytest.raises(ic.ModelTooLargeError) as caught:
        ic.from_onnx(model, memory_limit_bytes=24 * 2**30, structure="csr")
    message = str(caught.value)
    estimate = float(message.split("about ")[1].split("G non-zeros")[0])
    assert 3.5 <= estimate <= 4.5, message  # ResNet-50 does ~4.1 GMACs at 224 x 224
    assert "GB" in message and "smaller input resolution" in message


@pytest.mark.slow
def test_resnet50_at_224_compiles_structured():
    """Its convolutions are kernels (zero weights are kernels too: 0 non-zeros, but their terms
    are kept), the CSR remainder holds the pooling trees and the residual identities; the
    estimate's count is near what is stored."""
    model = _resnet50()
    prepared = prepare(model)
    compiled = ic.from_onnx(model, dtype=np.float32, memory_limit_bytes=8 * 2**30)
    structure = compiled.structure
    terms = [term for name in "ABCD" for term in getattr(structure, name).terms]
    assert len(terms) == 54  # 53 convolutions (the first reads the input: B) and the classifier (C)
    assert len(structure.B.terms) == 1 and [type(t.op) for t in structure.C.terms] == [Dense]
    kernels = sum(term.op.weight.size for term in terms)
    assert kernels == sum(np.prod(w.dims) for w in model.graph.initializer)  # every weight once
    remainder = sum(getattr(structure, name).remainder.nnz for name in "ABCD")
    assert remainder < compiled.n  # the maxpool trees and the identities: under 1 per state
    stored = kernels + remainder + compiled.n
    assert stored / 1.5 <= estimate_nonzeros(prepared, structured=True) <= 1.5 * stored
    assert compiled.memory_bytes < 1e9  # against ~49 GB as float32 CSR
