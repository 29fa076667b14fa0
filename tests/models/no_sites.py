"""A purely linear model: its only site is the input, so ``--exclude input`` leaves none."""

from torch import nn


class Linear(nn.Module):
    input_size = (4,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)
