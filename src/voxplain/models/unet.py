"""Small U-Nets for BraTS-style region segmentation (one sigmoid channel per region).

* :class:`RegionUNet` is MONAI's ``UNet`` (residual units, stride-2 convolutions down,
  stride-2 transposed convolutions up);
* :class:`InterpUNet` changes resolution by max-pooling and (tri)linear upsampling only,
  every convolution has stride 1: its input gradients carry no stride checkerboard
  (``benchmarks/bench_checkerboard.py``). The demo's U-Net is this one.

Both use BatchNorm and plain (not in-place) ReLU modules: BatchNorm folds into an
affine map at inference, so integrated-gradients completeness holds, and ReLU modules
are what guided backprop rewrites. Both pad any input up to a multiple of the
network's total stride and crop the output back, so volumes of any size can be
segmented and explained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionUNet", "InterpUNet"]


class RegionUNet(nn.Module):
    """3D (or 2D) U-Net with ``out_channels`` region logits (apply a sigmoid per channel).

    Args:
        dims: spatial dimensions (3 for volumes, 2 for slices).
        in_channels: input modalities (4 for BraTS: t1, t1ce, t2, flair).
        out_channels: region channels (3 for ET, TC, WT).
        channels: feature widths per level; one fewer stride-2 downsampling than levels.
        num_res_units: residual units per MONAI block.
        dropout: dropout inside the blocks.
    """

    def __init__(self, dims: int = 3, in_channels: int = 4, out_channels: int = 3,
                 channels: Sequence[int] = (8, 16, 32, 64), num_res_units: int = 1, dropout: float = 0.0):
        super().__init__()
        from monai.networks.nets import UNet

        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        self.dims = int(dims)
        self.in_channels = int(in_channels)
        self.multiple = 2 ** (len(channels) - 1)
        self.net = UNet(spatial_dims=self.dims, in_channels=self.in_channels, out_channels=int(out_channels),
                        channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=int(num_res_units),
                        act="relu", norm="batch", dropout=float(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _padded_forward(self, self.net, x)


def _padded_forward(unet: nn.Module, net, x: torch.Tensor) -> torch.Tensor:
    """Check ``x`` against ``unet.dims`` / ``unet.in_channels``, zero-pad it up to a multiple of
    ``unet.multiple``, run ``net`` and crop the output back to ``x``'s spatial size."""
    if x.ndim != unet.dims + 2 or x.shape[1] != unet.in_channels:
        raise ValueError(
            f"expected input of shape (B, {unet.in_channels}, {', '.join(['*'] * unet.dims)}), "
            f"got {tuple(x.shape)}"
        )
    spatial = x.shape[2:]
    extra = [(-s) % unet.multiple for s in spatial]
    if not any(extra):
        return net(x)
    # F.pad lists the last dimension first
    out = net(F.pad(x, [p for e in reversed(extra) for p in (0, e)]))
    return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {"max": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
         "avg": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}}
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _conv_block(dims: int, n_in: int, n_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [_CONV[dims](n_in if i == 0 else n_out, n_out, 3, padding=1, bias=False), _BN[dims](n_out),
                   nn.ReLU()]
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    """2x interpolation (a module, so hooks and layer listings see it)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode=_LINEAR_MODE[x.ndim - 2], align_corners=False)


class InterpUNet(nn.Module):
    """U-Net whose resolution changes are pooling and interpolation, never strided convolutions.

    Encoder: per level ``convs`` x (conv 3 - BatchNorm - ReLU), then 2x pooling.
    Decoder: 2x interpolation (``up``: ``"linear"`` = (bi/tri)linear, or ``"nearest"``),
    concatenation with the skip, ``convs`` x (conv-BN-ReLU); a 1x1 convolution gives
    ``out_channels`` region logits. Every convolution has stride 1, so neither the
    forward pass nor the backward pass to the input goes through an uneven-overlap
    (transposed) strided kernel: input gradients carry no stride-periodic checkerboard
    (``benchmarks/bench_checkerboard.py`` measures it). Like :class:`RegionUNet` it pads
    inputs to a multiple of its total stride and crops the output back.

    Args:
        dims: spatial dimensions (1, 2 or 3).
        in_channels / out_channels: input modalities / output region channels.
        channels: feature widths per level (one 2x pooling between levels).
        convs: convolutions per level and per side: one number, or one per level; default
            (None) one at full resolution, where a convolution costs most, two below.
        down: ``"max"`` or ``"avg"`` pooling.
        up: ``"linear"`` or ``"nearest"`` interpolation.
    """

    def __init__(self, dims: int = 3, in_channels: int = 4, out_channels: int = 3,
                 channels: Sequence[int] = (8, 16, 32, 64), convs: int | Sequence[int] | None = None,
                 down: str = "max", up: str = "linear"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if dims not in _CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs at least two positive widths, got {channels}")
        if convs is None:
            convs = [1] + [2] * (len(channels) - 1)
        per_level = [int(convs)] * len(channels) if isinstance(convs, int) else [int(c) for c in convs]
        if down not in _POOL or up not in ("linear", "nearest") or len(per_level) != len(channels) \
                or min(per_level) < 1:
            raise ValueError(f"down must be 'max' or 'avg', up 'linear' or 'nearest', convs >= 1 (one number or one "
                             f"per level of {channels}); got {down!r}, {up!r}, {convs!r}")
        self.dims, self.in_channels = int(dims), int(in_channels)
        self.multiple = 2 ** (len(channels) - 1)
        self.encoders = nn.ModuleList([_conv_block(dims, self.in_channels, channels[0], per_level[0])])
        self.pools = nn.ModuleList()
        for level in range(1, len(channels)):
            self.pools.append(_POOL[down][dims](2))
            self.encoders.append(_conv_block(dims, channels[level - 1], channels[level], per_level[level]))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(len(channels) - 2, -1, -1):
            # the channel reduction runs at the coarse level (cheaper), then the map is interpolated
            n_deep, n_skip = channels[level + 1], channels[level]
            self.ups.append(nn.Sequential(_CONV[dims](n_deep, n_skip, 1, bias=False), _BN[dims](n_skip), nn.ReLU(),
                                          _Upsample(up)))
            self.decoders.append(_conv_block(dims, 2 * n_skip, n_skip, per_level[level]))
        self.head = _CONV[dims](channels[0], int(out_channels), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _padded_forward(self, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
