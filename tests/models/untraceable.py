"""A model whose block branches on a tensor's value: torch.fx cannot trace it, unless the
block is made a leaf (``--leaf DataDependentGate``)."""

import torch
from torch import nn


class DataDependentGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: line 10
            return x
        return -x


class Untraceable(nn.Module):
    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.gate = DataDependentGate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.act(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def build_model() -> nn.Module:
    return Untraceable()
