"""The original U-Net (Ronneberger et al. 2015), with 'same' padding and batch norm.

Padding keeps output size == input size (the 2015 paper cropped instead), so tiles
blend without bookkeeping; input sides must be multiples of ``2**depth`` (the tiler pads).
"""

from __future__ import annotations

import torch
from torch import nn


def double_conv(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class VanillaUNet(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 2, base_channels: int = 64, depth: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decode = nn.ModuleList(
            double_conv(2 * widths[i], widths[i], dropout) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], classes, 1)
        self.output_stride = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        x = skips.pop()
        for up, decode in zip(self.up, self.decode):
            x = decode(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
