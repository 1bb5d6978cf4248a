"""A small 3D U-Net for BraTS-style region segmentation (one sigmoid channel per region).

The network is MONAI's ``UNet`` (residual units, strided convolutions) with
BatchNorm and plain ReLU: BatchNorm folds into an affine map at inference, so
integrated-gradients completeness holds, and ReLU is what guided backprop rewrites.
``RegionUNet`` pads any input up to a multiple of the network's total stride and
crops the output back, so volumes of any size can be segmented and explained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionUNet"]


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
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.dims)}), "
                f"got {tuple(x.shape)}"
            )
        spatial = x.shape[2:]
        extra = [(-s) % self.multiple for s in spatial]
        if not any(extra):
            return self.net(x)
        # F.pad lists the last dimension first
        pad = [p for e in reversed(extra) for p in (0, e)]
        out = self.net(F.pad(x, pad))
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
