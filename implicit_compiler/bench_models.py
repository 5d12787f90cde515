"""ImageNet-size networks for the benchmark and the slow tests, built with onnx.helper.

    model = resnet(18)            # ResNet-18 at 224 x 224, seeded random weights
    model = resnet(50, size=64)   # ResNet-50 v1.5 at 64 x 64

torchvision's architectures (He et al. 2016): a 7x7 stride-2 convolution, 3x3 stride-2 max
pool, four stages of basic blocks (ResNet-18: 2-2-2-2; ResNet-34: 3-4-6-3) or bottlenecks
(ResNet-50: 3-4-6-3, the stride in the 3x3 convolution as in v1.5), a projection shortcut (1x1
convolution and BatchNormalization) where the shape changes, global average pooling and a
1000-way Gemm. Every convolution is followed by BatchNormalization in inference mode, so the
lowering folds it.

The weights are random (no download, no torch) but keep activations of order one, as trained
weights do: He-normal kernels, BatchNormalization statistics near those of its input (mean
about 0, variance about 1), gamma in [0.5, 1], beta in [-0.1, 0.1], the last BatchNormalization
of each residual branch scaled down (gamma in [0, 0.25]) as in "zero-init residual" training.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


def resnet(depth: int = 18, size: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-``depth`` (18, 34 or 50) on ``size`` x ``size`` RGB images, input "image"
    (N, 3, size, size) with a symbolic batch, output "logits" (N, classes)."""
    if depth not in STAGES:
        raise ValueError(f"depth must be one of {sorted(STAGES)}, got {depth}")
    builder = _Builder(np.random.default_rng(seed))
    kind, blocks = STAGES[depth]
    x = builder.conv("image", 3, 64, 7, stride=2)
    x = builder.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = 64
    for stage, count in enumerate(blocks):
        width = 64 << stage
        for index in range(count):
            stride = 2 if index == 0 and stage > 0 else 1
            if kind == "basic":
                x, channels = builder.basic_block(x, channels, width, stride), width
            else:
                x, channels = builder.bottleneck(x, channels, width, stride), 4 * width
    x = builder.node("GlobalAveragePool", [x])
    x = builder.node("Flatten", [x])
    weight = builder.weight(builder.rng.normal(0, np.sqrt(1 / channels), (classes, channels)), "fc.weight")
    bias = builder.weight(np.zeros(classes), "fc.bias")
    builder.nodes.append(helper.make_node("Gemm", [x, weight, bias], ["logits"], transB=1))
    graph = helper.make_graph(
        builder.nodes, f"resnet{depth}_{size}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        builder.weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="implicit_compiler")
    onnx.checker.check_model(model)
    return model


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.weights, self.count = rng, [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, value: np.ndarray, name: str) -> str:
        self.weights.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def conv(
        self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True, last: bool = False
    ) -> str:
        """Conv (no bias) -> BatchNormalization -> Relu (unless ``relu`` is False)."""
        stem = self.name("conv")
        fan_in = c_in * k * k
        kernel = self.weight(self.rng.normal(0, np.sqrt(2 / fan_in), (c_out, c_in, k, k)), f"{stem}.weight")
        conv = self.node("Conv", [x, kernel], kernel_shape=[k, k], strides=[stride] * 2, pads=[k // 2] * 4)
        gamma = self.rng.uniform(0, 0.25, c_out) if last else self.rng.uniform(0.5, 1.0, c_out)
        parameters = [
            self.weight(gamma, f"{stem}.bn.scale"),
            self.weight(self.rng.uniform(-0.1, 0.1, c_out), f"{stem}.bn.bias"),
            self.weight(self.rng.normal(0, 0.1, c_out), f"{stem}.bn.mean"),
            self.weight(self.rng.uniform(1.0, 2.0, c_out), f"{stem}.bn.var"),
        ]
        x = self.node("BatchNormalization", [conv, *parameters], epsilon=1e-5)
        return self.node("Relu", [x]) if relu else x

    def basic_block(self, x: str, c_in: int, width: int, stride: int) -> str:
        h = self.conv(x, c_in, width, 3, stride)
        h = self.conv(h, width, width, 3, relu=False, last=True)
        return self._join(x, h, c_in, width, stride)

    def bottleneck(self, x: str, c_in: int, width: int, stride: int) -> str:
        h = self.conv(x, c_in, width, 1)
        h = self.conv(h, width, width, 3, stride)
        h = self.conv(h, width, 4 * width, 1, relu=False, last=True)
        return self._join(x, h, c_in, 4 * width, stride)

    def _join(self, x: str, h: str, c_in: int, c_out: int, stride: int) -> str:
        """relu(h + shortcut), the shortcut a projection where the shape changes."""
        shortcut = x if (c_in, stride) == (c_out, 1) else self.conv(x, c_in, c_out, 1, stride, relu=False)
        return self.node("Relu", [self.node("Add", [h, shortcut])])
