"""A model torch.fx cannot trace whose activations are all functions: the module-level
fallback reaches none of them, so ``surgeon insert`` fails with the tracer's reason."""

import torch
import torch.nn.functional as F
from torch import nn


class Untraceable(nn.Module):
    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if x.mean() > 0:  # data-dependent control flow
            x = -x
        return self.fc(x.mean((2, 3)))
