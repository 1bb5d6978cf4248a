"""Turn raw images and attribution maps into small arrays ready to display.

Everything here works on numpy arrays of shape (C, *spatial) for one sample,
with one or two (image) or three (volume) spatial dimensions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..display import percentile_normalise, reduce_channels

__all__ = [
    "as_numpy", "display_map", "display_image", "downsample", "quantise", "best_slice", "spatial_dims",
]


def as_numpy(array) -> np.ndarray:
    """A float32 numpy copy of a tensor or array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    return np.asarray(array, dtype=np.float32)


def spatial_dims(array: np.ndarray) -> int:
    """Number of spatial dimensions of a (C, *spatial) array, checked to be 2 or 3."""
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a (C, H, W) image or (C, X, Y, Z) volume, got shape {tuple(array.shape)}")
    return array.ndim - 1


def display_map(attribution, reduction: str = "abs_sum", percentile: float = 99.0) -> tuple[np.ndarray, float]:
    """One map (C, *spatial) -> (magnitudes in [0, 1] of shape spatial, the raw value shown as 1).

    Channels are reduced with :func:`voxplain.reduce_channels` and scaled by the
    ``percentile``-th value (PAIR's display convention), clipping above it.
    """
    a = torch.as_tensor(as_numpy(attribution))[None]
    reduced = reduce_channels(a, reduction)
    flat = reduced.flatten().abs().to(torch.float64)
    top = float(torch.quantile(flat, percentile / 100.0)) if flat.numel() > 1 else float(flat.max())
    if top <= 0:
        top = float(flat.max())
    return percentile_normalise(reduced, percentile)[0, 0].numpy(), top


def display_image(channel, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """A grey image/volume scaled to [0, 1] between its ``low`` and ``high`` percentiles (of non-zero voxels).

    Exact zeros (the background of a skull-stripped, z-scored scan) stay black.
    """
    c = as_numpy(channel)
    values = c[c != 0] if np.any(c != 0) else c.ravel()
    lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((c - lo) / (hi - lo), 0.0, 1.0)
    out[c == 0] = 0.0
    return out.astype(np.float32)


def downsample(volume: np.ndarray, max_voxels: int) -> tuple[np.ndarray, int]:
    """Block-average a spatial array by the smallest integer factor that brings it under ``max_voxels``."""
    factor = 1
    while math.prod(math.ceil(s / factor) for s in volume.shape) > max_voxels:
        factor += 1
    if factor == 1:
        return volume, 1
    pad = [(0, (-s) % factor) for s in volume.shape]
    v = np.pad(volume, pad, mode="edge")
    shape = []
    for s in v.shape:
        shape += [s // factor, factor]
    v = v.reshape(shape).mean(axis=tuple(range(1, 2 * volume.ndim, 2)))
    return v.astype(np.float32), factor


def quantise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 0..255."""
    return np.clip(np.rint(np.asarray(values) * 255.0), 0, 255).astype(np.uint8)


def best_slice(volume: np.ndarray, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the largest sum (the most to see)."""
    other = tuple(i for i in range(volume.ndim) if i != axis % volume.ndim)
    sums = np.asarray(volume, dtype=np.float64).sum(axis=other)
    return int(np.argmax(sums)) if sums.size else 0
