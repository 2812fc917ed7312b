"""Highway layer (Srivastava, Greff & Schmidhuber 2015) as Kim et al. 2016 use it.

    z = t * g(W_H y + b_H) + (1 - t) * y,    t = sigmoid(W_T y + b_T + carry_bias)

g is ReLU. `carry_bias` is a fixed constant (-2 in Kim's HighwayMLP.lua, added on top of the
learned b_T), so that with small weights t is about sigmoid(-2) = 0.12 and the layer starts
close to the identity: the character CNN's features pass through almost unchanged at first.
"""

from __future__ import annotations

import torch
from torch import nn


class Highway(nn.Module):
    def __init__(self, size: int, carry_bias: float = -2.0) -> None:
        super().__init__()
        self.transform = nn.Linear(size, size)  # W_H, b_H
        self.gate = nn.Linear(size, size)  # W_T, b_T
        self.carry_bias = carry_bias

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y (..., size) -> z (..., size)."""
        t = torch.sigmoid(self.gate(y) + self.carry_bias)
        return t * torch.relu(self.transform(y)) + (1.0 - t) * y
