"""A small LSTM sequence classifier for scikit-learn's 8x8 digits read row by row.

Architecture, input (N, 8, 8) -> output (N, 10) logits::

    lstm  LSTM(input_size=8, hidden_size=16, 1 layer, unidirectional, batch_first=True)
          over the 8 image rows (time steps) of 8 pixels (features); zero initial state
          -> h_n of the last time step                    (1, N, 16)
          h_n[0]                                          (N, 16)
    fc    Linear(16 -> 10)                                (N, 10) logits (no softmax)

1,834 parameters (LSTM 4 * 16 * (8 + 16) weights + 2 * 4 * 16 biases = 1,664; linear 170; torch
keeps separate input and recurrent biases, as ONNX's LSTM does).

This module is a torch definition only; `zoo/export_recurrent.py` trains it on scikit-learn's
digits (pixels / 16, rows as time steps) and exports it to `zoo/lstm_classifier.onnx`.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS = 8  # sequence length (time steps)
COLUMNS = 8  # features per time step
HIDDEN = 16
CLASSES = 10


class LSTMClassifier(nn.Module):
    """LSTM over the rows of an 8x8 image, then a linear layer on the last hidden state."""

    def __init__(self, input_size: int = COLUMNS, hidden_size: int = HIDDEN, num_classes: int = CLASSES):
        super().__init__()
        self.lstm = nn.LSTM(input_size=input_size, hidden_size=hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)  # h_n: (num_layers * num_directions = 1, N, hidden)
        return self.fc(h_n[0])
