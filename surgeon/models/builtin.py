"""Built-in models of the thesis: All-CNN-C and an MLP, both He-initialised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def he_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-in, ReLU gain) weights and zero biases for convs and linears."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class AllConvC(nn.Module):
    """All-CNN-C (Springenberg et al. 2014) for 32x32 inputs.

    conv3x3-96, conv3x3-96, conv3x3-96/2, conv3x3-192, conv3x3-192, conv3x3-192/2,
    conv3x3-192 valid, conv1x1-192, conv1x1-classes, global average pool, with a ReLU after
    every conv, the last one included (Springenberg's table: "1x1 conv. 10 ReLU"; the softmax
    is in the loss). ``final_relu=False`` drops the last ReLU (fx-surgeon 0.1's net). With
    ``dropout``: 0.2 on the input and 0.5 after each stride-2 conv.
    """

    input_size = (3, 32, 32)

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        dropout: bool = False,
        width: float = 1.0,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        c1, c2 = max(1, round(96 * width)), max(1, round(192 * width))
        self.num_classes = num_classes
        self.input_drop = nn.Dropout(0.2) if dropout else nn.Identity()

        def block(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, pad), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, c1, 3),
            *block(c1, c1, 3),
            *block(c1, c1, 3, stride=2),
            nn.Dropout(0.5) if dropout else nn.Identity(),
            *block(c1, c2, 3),
            *block(c2, c2, 3),
            *block(c2, c2, 3, stride=2),
            nn.Dropout(0.5) if dropout else nn.Identity(),
            *block(c2, c2, 3, pad=0),
            *block(c2, c2, 1, pad=0),
            *(block(c2, num_classes, 1, pad=0) if final_relu else [nn.Conv2d(c2, num_classes, 1)]),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.input_drop(x))
        return torch.flatten(self.pool(x), 1)


class MLP(nn.Module):
    """Flatten, hidden Linear+ReLU layers, a Linear classifier; He init.

    With ``dropout``: 0.2 on the input and 0.5 after each hidden activation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        hidden: Sequence[int] = (1024, 512, 256),
        input_size: Sequence[int] = (3, 32, 32),
        dropout: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        self.num_classes = num_classes
        width = 1
        for s in self.input_size:
            width *= s
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(0.2) if dropout else nn.Identity()]
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(0.5))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


BUILTINS = {"allconv": AllConvC, "mlp": MLP}
