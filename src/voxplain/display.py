"""Helpers that turn raw signed maps into something to look at."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["reduce_channels", "percentile_normalise", "CHANNEL_REDUCTIONS"]

CHANNEL_REDUCTIONS = ("abs_sum", "sum", "max", "abs_max")


def reduce_channels(attribution: Tensor, how: str = "abs_sum") -> Tensor:
    """Collapse the channel axis of a (B, C, *spatial) map to (B, 1, *spatial).

    ``how``: ``"abs_sum"`` (sum of magnitudes, as PAIR's VisualizeImageGrayscale),
    ``"sum"`` (signed sum), ``"max"`` (largest signed value) or ``"abs_max"`` (largest magnitude).
    """
    if attribution.ndim < 3:
        raise ValueError(f"expected a (B, C, *spatial) map, got shape {tuple(attribution.shape)}")
    if how == "abs_sum":
        return attribution.abs().sum(dim=1, keepdim=True)
    if how == "sum":
        return attribution.sum(dim=1, keepdim=True)
    if how == "max":
        return attribution.amax(dim=1, keepdim=True)
    if how == "abs_max":
        return attribution.abs().amax(dim=1, keepdim=True)
    raise ValueError(f"how must be one of {CHANNEL_REDUCTIONS}, got {how!r}")


def percentile_normalise(attribution: Tensor, percentile: float = 99.0, signed: bool = False) -> Tensor:
    """Scale each sample of a (B, ...) map to [0, 1] (or [-1, 1] if ``signed``), clipping at a percentile.

    Unsigned: magnitudes are divided by their ``percentile``-th value and clipped to 1,
    the display convention of PAIR's ``saliency`` (99th percentile). A map that is
    all zeros stays all zeros.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    flat = attribution.detach().flatten(1).to(torch.float64)
    mag = flat.abs()
    top = torch.quantile(mag, percentile / 100.0, dim=1, keepdim=True) if mag.shape[1] > 1 else mag
    top = torch.where(top > 0, top, mag.amax(dim=1, keepdim=True))
    top = torch.where(top > 0, top, torch.ones_like(top))
    values = flat if signed else mag
    out = (values / top).clamp(-1.0 if signed else 0.0, 1.0)
    return out.reshape(attribution.shape).to(torch.float32)
