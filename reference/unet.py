"""The 3D U-Net written plainly: the oracle for ``fasttversky.app.models.UNet3D``.

No checkpointing, no in-place operations, no autocast, one module call per layer.
Parameter names and registration order are those of ``fasttversky.app.models.UNet3D``
so that state_dicts load into each other. Never imported by the package.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(norm: str, features: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm3d(features)
    if norm == "instance":
        return nn.InstanceNorm3d(features, affine=True)
    raise ValueError(norm)


class ReferenceDoubleConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=norm == "none")
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=norm == "none")
        self.norm2 = _norm(norm, c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        return x


class ReferenceUp(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, 2, stride=2)
        self.conv = ReferenceDoubleConv(2 * c_out, c_out, norm)

    def forward(self, x, skip):
        x = self.up(x)
        x = torch.cat([skip, x], dim=1)
        return self.conv(x)


class ReferenceUNet3D(nn.Module):
    """Plain 3D U-Net. x (B, in_channels, D, H, W) -> logits (B, num_classes, D, H, W)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 32,
        levels: int = 4,
        norm: str = "none",
    ):
        super().__init__()
        feats = [base_features * 2**i for i in range(levels)]
        self.encoders = nn.ModuleList()
        for i in range(levels):
            c_in = in_channels if i == 0 else feats[i - 1]
            self.encoders.append(ReferenceDoubleConv(c_in, feats[i], norm))
        self.decoders = nn.ModuleList()
        for i in range(levels - 1):
            self.decoders.append(ReferenceUp(feats[i + 1], feats[i], norm))
        self.head = nn.Conv3d(feats[0], num_classes, 1)
        self.pool = nn.MaxPool3d(2)

    def forward(self, x):
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.decoders))):
            x = self.decoders[i](x, skips.pop())
        return self.head(x)
