"""LeNet-5 (LeCun et al. 1998) for 32x32 single-channel images, in its common modern form.

Architecture, input (N, 1, 32, 32) -> output (N, 10) logits::

    conv1  Conv2d(1 -> 6, 5x5, stride 1, no padding)   (N, 6, 28, 28)
           ReLU
    pool1  MaxPool2d(2x2, stride 2)                     (N, 6, 14, 14)
    conv2  Conv2d(6 -> 16, 5x5, stride 1, no padding)  (N, 16, 10, 10)
           ReLU
    pool2  MaxPool2d(2x2, stride 2)                     (N, 16, 5, 5)
           flatten                                      (N, 400)
    fc1    Linear(400 -> 120), ReLU                     (N, 120)
    fc2    Linear(120 -> 84), ReLU                      (N, 84)
    fc3    Linear(84 -> 10)                             (N, 10) logits (no softmax)

Compared with the 1998 paper: ReLU instead of scaled tanh, max pooling instead of trainable
subsampling, a full C3 connection table, and a plain linear output layer instead of the RBF
units. 61,706 parameters.

This module is a torch definition only; `zoo/export.py` trains it on scikit-learn's digits
(upsampled to 32x32 by `zoo/data.py`) and exports it to `zoo/lenet5.onnx`.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5: two conv/ReLU/max-pool stages and three fully connected layers (see module docstring)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu(self.conv1(x)))
        x = self.pool2(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
