"""ResNet20 for CIFAR-10-shaped input (He et al., "Deep Residual Learning for Image Recognition", 2016, Sec. 4.2).

Architecture, input (N, 3, 32, 32) -> output (N, 10) logits::

    stem    conv3x3(3 -> 16, stride 1, pad 1, no bias) + BatchNorm + ReLU        (N, 16, 32, 32)
    stage1  3 x BasicBlock(16 -> 16, stride 1)                                   (N, 16, 32, 32)
    stage2  BasicBlock(16 -> 32, stride 2) + 2 x BasicBlock(32 -> 32)            (N, 32, 16, 16)
    stage3  BasicBlock(32 -> 64, stride 2) + 2 x BasicBlock(64 -> 64)            (N, 64, 8, 8)
    head    global average pooling -> flatten -> Linear(64 -> 10)                (N, 10) logits

    BasicBlock(x) = ReLU( BN(conv3x3(ReLU(BN(conv3x3(x, stride))))) + shortcut(x) )

1 + 3 * 3 * 2 = 19 convolutions plus the linear layer make the 20 weighted layers; 19 BatchNorms.
The shortcut is the paper's "option A" (parameter-free): the identity where the shape is unchanged,
and where it changes (first block of stages 2 and 3) spatial subsampling ``x[:, :, ::2, ::2]``
followed by zero-padding of the channel dimension (``planes // 4`` zero channels on each side,
so 16 -> 32 and 32 -> 64). 269,722 parameters (all in convolutions, BatchNorm affine parameters
and the linear layer; option A adds none).

This module is a torch definition only; `zoo/export.py` gives it seeded random weights with
non-trivial BatchNorm statistics and exports it to `zoo/resnet20.onnx`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 in space and zero-pad channels from in_planes to planes."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        pad = planes - in_planes
        if pad < 0 or pad % 2:
            raise ValueError(f"option-A shortcut needs an even channel increase, got {in_planes} -> {planes}")
        self.pad = pad // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad pads the last dimensions first: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2:
                raise ValueError("option-A shortcut is defined for stride 2 only")
            self.shortcut: nn.Module = ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet20 with option-A shortcuts (see module docstring)."""

    def __init__(self, num_classes: int = 10, num_blocks: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(32, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)
