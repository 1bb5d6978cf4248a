"""Plain convolutional classifiers in 1, 2 or 3 spatial dimensions.

``ConvClassifier`` is CXAI's n-block CNN (conv-BN-ReLU-maxpool blocks with growing
widths, global average pooling, dropout, linear) written once for any number of
spatial dimensions: the zoo's ``cnn2d`` and ``classifier3d`` are two settings of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvClassifier", "block_widths", "pooling_plan"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAXGLOBAL = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}


def block_widths(blocks: int, base_width: int, max_width: int) -> list[int]:
    """Channel widths of the conv blocks: doubling from ``base_width``, capped at ``max_width``."""
    return [min(base_width * 2 ** i, max_width) for i in range(blocks)]


def pooling_plan(blocks: int, image_size: Sequence[int] | None) -> list[bool]:
    """Which blocks end with a 2x max-pool: every block while the smallest side is still >= 2.

    Without an ``image_size`` every block pools; the pools use ``ceil_mode`` so an
    input smaller than planned still never shrinks to zero size.
    """
    if image_size is None:
        return [True] * blocks
    size = min(int(s) for s in image_size)
    plan = []
    for _ in range(blocks):
        pool = size >= 2
        plan.append(pool)
        if pool:
            size = (size + 1) // 2
    return plan


class ConvClassifier(nn.Module):
    """n conv blocks (conv-BN-ReLU[-maxpool]) -> global average pool -> dropout -> linear.

    Args:
        dims: number of spatial dimensions (1, 2 or 3).
        in_channels: input channels (1 grey, 3 RGB, 4 BraTS modalities ...).
        num_classes: output logits.
        blocks: number of conv blocks (CXAI uses 3, 5 and 7).
        base_width: channels of the first block; each next block doubles, up to ``max_width``.
        image_size: expected spatial size, used to skip pooling once a side reaches 1.
        dropout: dropout probability before the linear layer.
        global_pool: ``"avg"`` (global average pooling, as in CXAI) or ``"max"`` (global max
            pooling: suits labels decided by a small local finding, e.g. enhancing tumour).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, num_classes: int = 2, blocks: int = 3,
                 base_width: int = 16, max_width: int = 128, image_size: Sequence[int] | int | None = None,
                 dropout: float = 0.3, global_pool: str = "avg"):
        super().__init__()
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        if dims not in _CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        if int(blocks) < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks!r}")
        if int(num_classes) < 1 or int(in_channels) < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels!r} and {num_classes!r}")
        if isinstance(image_size, int):
            image_size = (image_size,) * dims
        if image_size is not None and len(image_size) != dims:
            raise ValueError(f"image_size must have {dims} sides for dims={dims}, got {tuple(image_size)}")
        self.dims = dims
        self.in_channels = int(in_channels)
        layers: list[nn.Module] = []
        width_in = self.in_channels
        widths = block_widths(int(blocks), int(base_width), int(max_width))
        for i, (width, pool) in enumerate(zip(widths, pooling_plan(int(blocks), image_size))):
            block = [_CONV[dims](width_in, width, 3, padding=1, bias=False), _BN[dims](width), nn.ReLU()]
            if pool:
                block.append(_MAXPOOL[dims](2, ceil_mode=True))
            layers.append(nn.Sequential(*block))
            width_in = width
        self.features = nn.Sequential(*layers)
        self.pool = (_AVGPOOL if global_pool == "avg" else _MAXGLOBAL)[dims](1)
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(width_in, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.dims)}), "
                f"got {tuple(x.shape)}"
            )
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))
