"""Attention Residual U-Net: residual conv blocks (He et al.) in a U-Net, with additive
attention gates on the skip connections (Oktay et al. 2018, "Attention U-Net")."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout2d(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.body(x) + self.shortcut(x)))


class AttentionGate(nn.Module):
    """Weights the skip features ``x`` by a [0, 1] map computed from them and the coarser gate ``g``."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inter_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.theta(x) + self.phi(g))


class AttentionResUNet(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 2, base_channels: int = 32, depth: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = ResidualBlock(in_channels, widths[0])
        self.down = nn.ModuleList(ResidualBlock(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        levels = list(reversed(range(depth)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.gates = nn.ModuleList(AttentionGate(widths[i], widths[i], max(widths[i] // 2, 1)) for i in levels)
        self.decode = nn.ModuleList(ResidualBlock(2 * widths[i], widths[i], dropout) for i in levels)
        self.head = nn.Conv2d(widths[0], classes, 1)
        self.output_stride = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        x = skips.pop()
        for up, gate, decode in zip(self.up, self.gates, self.decode):
            x = up(x)
            skip = skips.pop()
            x = decode(torch.cat([x, gate(skip, x)], dim=1))
        return self.head(x)
