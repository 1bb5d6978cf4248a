"""Tumour features read from an explanation: volume and centroid of a thresholded map.

NeuroXAI's outlook: if a map highlights the tumour, thresholding it should give a
usable estimate of the tumour's size and position. :func:`threshold_map` turns a
map (B, C, *spatial) into a mask (per-voxel absolute relevance, channels summed):

* ``"otsu"`` (default): voxels above Otsu's threshold of the sample's relevance;
* ``"fraction"``: voxels with relevance >= ``value`` x the sample's maximum (default 0.5);
* ``"percentile"``: voxels above the ``value``-th percentile (default 95);

optionally keeping only the largest connected component (``largest=True``,
face connectivity). :func:`feature_errors` compares the estimate with the true
mask: volumes (ml when ``spacing`` in mm is given, else voxels), relative volume
error (pred - true) / true, centroid distance (mm, or voxels) and Dice.

Degenerate input: a constant (or all-zero) map gives an empty estimate (nothing
stands out). An empty estimate has volume 0, centroid NaN, distance NaN and
Dice 0; an empty true mask gives NaN relative error, distance and Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ._checks import as_map, as_mask, voxel_relevance

__all__ = ["threshold_map", "mask_features", "feature_errors", "THRESHOLDS"]

THRESHOLDS = ("otsu", "fraction", "percentile")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def threshold_map(attribution, method: str = "otsu", value: float | None = None,
                  largest: bool = True, reduce: str = "abs") -> np.ndarray:
    """Bool masks (B, *spatial) of the voxels a map marks as relevant."""
    if method not in THRESHOLDS:
        raise ValueError(f"threshold method must be one of {THRESHOLDS}, got {method!r}")
    r = voxel_relevance(as_map(attribution), reduce).double().numpy()
    out = np.zeros(r.shape, dtype=bool)
    for i, ri in enumerate(r):
        if ri.max() == ri.min():
            continue
        if method == "otsu":
            from skimage.filters import threshold_otsu

            m = ri > threshold_otsu(ri)
        elif method == "fraction":
            frac = 0.5 if value is None else float(value)
            if not 0 < frac <= 1:
                raise ValueError(f"fraction threshold must be in (0, 1], got {value}")
            m = ri >= frac * ri.max()
        else:
            q = 95.0 if value is None else float(value)
            if not 0 <= q < 100:
                raise ValueError(f"percentile threshold must be in [0, 100), got {value}")
            m = ri > np.percentile(ri, q)
        out[i] = _largest_component(m) if largest else m
    return out


def mask_features(mask: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Volume (B,) and centroid (B, D) of bool masks (B, *spatial); in mm/ml with ``spacing``."""
    mask = np.asarray(mask, dtype=bool)
    d = mask.ndim - 1
    sp = np.ones(d) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sp.shape != (d,):
        raise ValueError(f"spacing must give one voxel size per spatial axis ({d}), got {spacing}")
    unit = np.prod(sp) / (1000.0 if spacing is not None else 1.0)  # ml per voxel (or 1 voxel)
    volume = mask.reshape(mask.shape[0], -1).sum(1) * unit
    centroid = np.full((mask.shape[0], d), np.nan)
    for i, m in enumerate(mask):
        if m.any():
            centroid[i] = np.argwhere(m).mean(0) * sp
    return {"volume": volume, "centroid": centroid}


def feature_errors(attribution, true_mask, spacing: Sequence[float] | None = None, method: str = "otsu",
                   value: float | None = None, largest: bool = True) -> dict[str, np.ndarray]:
    """Volume and centroid estimated from the map vs the true mask, per sample.

    Returns ``{"volume_pred", "volume_true", "volume_error", "centroid_distance", "dice"}``, each (B,).
    """
    a = as_map(attribution)
    truth = as_mask(true_mask, tuple(a.shape[2:]), a.shape[0], "true mask").numpy()
    pred = threshold_map(a, method, value, largest)
    fp, ft = mask_features(pred, spacing), mask_features(truth, spacing)
    with np.errstate(invalid="ignore", divide="ignore"):
        vol_err = np.where(ft["volume"] > 0, (fp["volume"] - ft["volume"]) / ft["volume"], np.nan)
        dist = np.linalg.norm(fp["centroid"] - ft["centroid"], axis=1)
        inter = (pred & truth).reshape(len(pred), -1).sum(1)
        denom = pred.reshape(len(pred), -1).sum(1) + truth.reshape(len(truth), -1).sum(1)
        dice = np.where(truth.reshape(len(truth), -1).any(1), 2.0 * inter / np.maximum(denom, 1), np.nan)
    return {"volume_pred": fp["volume"], "volume_true": ft["volume"], "volume_error": vol_err,
            "centroid_distance": dist, "dice": dice}
