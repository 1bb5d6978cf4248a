"""Shared input checks and reductions for the evaluation metrics.

Attribution maps come as (B, C, *spatial) (C input channels, or 1 for
single-channel methods such as Grad-CAM); masks as (B, *spatial) or
(B, 1, *spatial). Metrics that score voxels first reduce a map over its
channels to one relevance value per voxel (:func:`voxel_relevance`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..run import as_batch_tensor

__all__ = ["as_map", "as_mask", "voxel_relevance", "REDUCTIONS"]

#: how a map's channels become one relevance per voxel
REDUCTIONS = ("abs", "positive", "signed")


def as_map(attribution, name: str = "attribution") -> Tensor:
    """``attribution`` as a finite float32 CPU tensor of shape (B, C, *spatial)."""
    a = as_batch_tensor(attribution, name).detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def as_mask(mask, spatial: tuple[int, ...], batch: int, name: str = "mask") -> Tensor:
    """``mask`` as a bool CPU tensor (B, *spatial); accepts (B, *spatial), (B, 1, *spatial) or (*spatial)."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(mask).__name__}")
    m = mask.detach().cpu()
    if tuple(m.shape) == tuple(spatial):
        m = m.unsqueeze(0).expand(batch, *spatial)
    elif m.ndim == len(spatial) + 2 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != (batch, *spatial):
        raise ValueError(f"{name} must have shape (B, *spatial) = {(batch, *spatial)} "
                         f"(or (B, 1, *spatial)) to match the map, got {tuple(mask.shape)}")
    if m.dtype != torch.bool:
        m = m != 0
    return m


def voxel_relevance(attribution: Tensor, reduce: str = "abs") -> Tensor:
    """One relevance per voxel, (B, *spatial), from a (B, C, *spatial) map.

    ``"abs"`` sums |a| over channels (evidence either way counts), ``"positive"``
    sums max(a, 0) (evidence for the score only), ``"signed"`` sums a.
    """
    if reduce == "abs":
        return attribution.abs().sum(dim=1)
    if reduce == "positive":
        return attribution.clamp(min=0).sum(dim=1)
    if reduce == "signed":
        return attribution.sum(dim=1)
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
