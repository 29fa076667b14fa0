"""Hand-written models, one per way of writing an activation, for exact site lists.

Each model is tiny and declares ``input_size`` (one sample, no batch dim), which
``surgeon.insert`` uses for shape propagation. Widths differ from spatial sizes on purpose,
so that a channel-mode parameter's size shows which axis was taken as the channel axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers.activations import GELUTanh, HardSwish
from torch import nn


class ModuleActs(nn.Module):
    """nn.ReLU, nn.ReLU(inplace=True) and nn.SiLU modules after convs."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True)
        self.conv3, self.act3 = nn.Conv2d(5, 7, 3, padding=1), nn.SiLU()
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class FunctionActs(nn.Module):
    """F.relu, torch.relu, F.gelu and F.relu(inplace=True) calls."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 7, 3, padding=1)
        self.conv4 = nn.Conv2d(7, 7, 1)
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        x = F.relu(self.conv4(x), inplace=True)
        return self.fc(x.mean((2, 3)))


class MethodActs(nn.Module):
    """x.relu(), x.relu_(), x.sigmoid() (an activation, not a gate) and x.tanh()."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 7, 3, padding=1)
        self.conv4 = nn.Conv2d(7, 7, 1)
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).relu()
        x = self.conv2(x).relu_()
        x = self.conv3(x).sigmoid()
        x = self.conv4(x).tanh()
        return self.fc(x.mean((2, 3)))


class TimmActs(nn.Module):
    """timm's own activation classes: GELUTanh and HardSwish."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), GELUTanh()
        self.conv2, self.act2 = nn.Conv2d(4, 5, 3, padding=1), HardSwish()
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class NormAct(nn.Module):
    """timm's fused BatchNormAct2d: a site when it applies its activation, none otherwise."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = BatchNormAct2d(5, apply_act=False)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Branching(nn.Module):
    """One ReLU feeding two convs: both must read the inserted module's output."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.left = nn.Conv2d(4, 5, 3, padding=1)
        self.right = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.stem(x))
        y = F.relu(self.left(a) + self.right(a))
        return self.fc(y.mean((2, 3)))


class ModuleListLoop(nn.Module):
    """A Python loop over an nn.ModuleList of Linear+ReLU blocks, on flat (N, C) features."""

    input_size = (6,)

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SoftmaxHead(nn.Module):
    """Ends in a softmax: the softmax is final and gets nothing."""

    input_size = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


class SigmoidHead(nn.Module):
    """A sigmoid output head (a multi-label classifier): final, excluded."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.act(self.conv(x)).mean((2, 3))))


class ReluThenPool(nn.Module):
    """A ReLU that reaches a linear classifier through pooling and flatten: not final.
    The ReLU on the output of the classifier is final."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        nn.init.constant_(self.fc.bias, 1.0)  # keeps the output ReLU alive for gradient checks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.act(self.conv(x))), 1)
        return F.relu(self.fc(x))


class SqueezeExcite(nn.Module):
    """A conv stage with a squeeze-excite gate: ``x * sigmoid(fc(pool(x)))``."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 2)
        nn.init.constant_(self.reduce.bias, 1.0)  # keeps the 2-channel ReLU alive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        x = x * torch.sigmoid(s)
        return self.fc(x.mean((2, 3)))


class SiluWrittenOut(nn.Module):
    """``x * torch.sigmoid(x)`` written by hand: one activation, whose site is the product."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(x)
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, permute to channels-last (N, H, W, C), LayerNorm,
    Linear, GELU, Linear, permute back, residual. The GELU's channel dim is 3."""

    input_size = (3, 6, 6)

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class PermutedRelu(nn.Module):
    """A ReLU on a permuted conv map, with no Linear after it: channel dim 3 from the
    permute alone."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x).permute(0, 2, 3, 1))
        return self.head(y.mean((1, 2)))


class TokenMLP(nn.Module):
    """Tokens (N, L, C): Linear, GELU, Linear. The GELU's channel dim is 2."""

    input_size = (4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(x.mean(1))


class TwoInputs(nn.Module):
    """A float image and an integer class index: only the float input is a site."""

    input_size = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.embed = nn.Conv2d(3, 4, 3, padding=1), nn.Embedding(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).mean((2, 3)) + self.embed(label)
        return self.fc(x)


# Models that branch on self.training (not site-list forms)


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, training=self.training)``: traced in train mode, FX bakes ``True``."""

    input_size = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.dropout(F.relu(self.fc1(x)), p=0.5, training=self.training))


class AuxHead(nn.Module):
    """Returns an extra output in train mode only (like GoogLeNet's auxiliary logits)."""

    input_size = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.aux, self.out = nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.training:
            return self.out(h), self.aux(h)
        return self.out(h)


FORMS = [
    ModuleActs, FunctionActs, MethodActs, TimmActs, NormAct, Branching, ModuleListLoop,
    SoftmaxHead, SigmoidHead, ReluThenPool, SqueezeExcite, SiluWrittenOut, ConvNeXtBlock,
    PermutedRelu, TokenMLP,
]  # fmt: skip
