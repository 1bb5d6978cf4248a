"""What the benchmark scripts share: the reference view of a segmentation net, frozen models, the
statistics given to untrained BatchNorm, the load average. Imported by the scripts beside it (run
them from the repository root as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["SpatialMean", "freeze", "randomise_batchnorm", "load_average"]


class SpatialMean(nn.Module):
    """A segmentation net seen as a classifier: the spatial mean of each class channel.

    Captum or PAIR on this wrapper with target k is what ``SegmentationTarget(k)`` explains.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten(2).mean(dim=2)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with its parameters frozen: every library then skips parameter gradients
    (voxplain restores these flags as they came)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def randomise_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give BatchNorm running statistics worth normalising by (untrained, it is the identity in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the record beside every timing."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
