"""A module-level ``model`` object."""

from torch import nn

model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2))
model.input_size = (3, 2, 2)
