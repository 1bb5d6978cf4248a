"""Tiny models shared by the tests (fast on CPU, 1-3 spatial dims)."""

from __future__ import annotations

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def classifier(dims: int = 2, in_channels: int = 2, classes: int = 3, width: int = 6,
               inplace: bool = False, batchnorm: bool = True, seed: int = 0) -> nn.Module:
    """conv-BN-ReLU-maxpool-conv-BN-ReLU -> global average pool -> linear."""
    torch.manual_seed(seed)
    conv, bn = _CONV[dims], _BN[dims]
    layers = [conv(in_channels, width, 3, padding=1)]
    if batchnorm:
        layers.append(bn(width))
    layers += [nn.ReLU(inplace=inplace), _MAXPOOL[dims](2), conv(width, width, 3, padding=1)]
    if batchnorm:
        layers.append(bn(width))
    layers += [nn.ReLU(inplace=inplace), _POOL[dims](1), nn.Flatten(), nn.Linear(width, classes)]
    model = nn.Sequential(*layers)
    return _randomise_bn(model, seed).train()


class TinySegNet(nn.Module):
    """A two-level encoder-decoder (U-Net-like) with BatchNorm, output (B, K, *spatial)."""

    def __init__(self, dims: int = 3, in_channels: int = 2, classes: int = 3, width: int = 4):
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        self.enc = nn.Sequential(conv(in_channels, width, 3, padding=1), bn(width), nn.ReLU())
        self.down = nn.Sequential(_MAXPOOL[dims](2), conv(width, 2 * width, 3, padding=1), bn(2 * width), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(conv(3 * width, width, 3, padding=1), bn(width), nn.ReLU())
        self.head = conv(width, classes, 1)

    def forward(self, x):
        e = self.enc(x)
        d = self.up(self.down(e))
        return self.head(self.dec(torch.cat([e, d], dim=1)))


def segnet(dims: int = 3, in_channels: int = 2, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(TinySegNet(dims, in_channels, classes), seed).train()


class SpatialMean(nn.Module):
    """Wraps a segmentation net: returns the spatial mean of each class channel, (B, K).

    Captum on this wrapper with target k is the reference for SegmentationTarget(k).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten(2).mean(dim=2)


def linear(in_shape=(2, 6, 6), classes: int = 3, seed: int = 0) -> nn.Module:
    """Flatten -> Linear: gradients are the weight rows, exactly."""
    torch.manual_seed(seed)
    n = 1
    for s in in_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, classes))


class FirstChannelSeg(nn.Module):
    """A (B, K, *spatial) 'segmentation' that reads only input channel 0: its input gradient lives in channel 0."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(1.0, 2.0, classes).view(1, classes, 1, 1, 1))

    def forward(self, x):
        return x[:, :1] * self.weight
