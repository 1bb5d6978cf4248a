"""Does a map find the tumour? Localisation metrics against a ground-truth mask.

Every function takes an attribution map (B, C, *spatial) and a mask
(B, *spatial) or (B, 1, *spatial), reduces the map to one relevance per voxel
(``reduce``: ``"abs"`` by default, see :func:`voxel_relevance`) and returns a
float64 numpy array (B,), one value per sample. 1, 2 and 3 spatial dimensions.

* :func:`pointing_game`: 1 if the most relevant voxel lies in the mask (or within
  ``tolerance`` voxels of it, Euclidean), else 0.
* :func:`relevance_mass`: share of the map's total relevance inside the mask
  (Arras et al. 2022).
* :func:`relevance_rank`: share of the K most relevant voxels that lie in the mask,
  K = mask volume (Arras et al. 2022).
* :func:`roc_auc`: area under the ROC curve of the relevance as a voxel-wise
  detector of the mask (Mann-Whitney, ties counted half).

Ties and degenerate input have defined values: ties are resolved by their
*expected value under random tie-breaking*, so a constant map (or an all-zero
one) scores chance level: pointing game, relevance mass and relevance rank
equal the mask's volume fraction (with the tolerance-dilated mask for the
pointing game), ROC AUC 0.5. An empty mask gives NaN for every metric (nothing
to find; aggregate with ``nanmean``). A mask covering every voxel gives 1 for
the first three metrics and NaN for ROC AUC (no negatives). A mask of the
wrong shape raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats

from ._checks import as_map, as_mask, voxel_relevance

__all__ = ["pointing_game", "relevance_mass", "relevance_rank", "roc_auc", "localisation_metrics",
           "region_localisation", "LOCALISATION_METRICS"]

LOCALISATION_METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "roc_auc")


def _prepare(attribution, mask, reduce: str):
    a = as_map(attribution)
    m = as_mask(mask, tuple(a.shape[2:]), a.shape[0])
    return voxel_relevance(a, reduce).double().numpy(), m.numpy()


def pointing_game(attribution, mask, tolerance: float = 0.0, reduce: str = "abs") -> np.ndarray:
    """Hit (1) or miss (0) of the map's maximum on the mask; ties give the expected hit rate.

    Args:
        tolerance: a maximum within this Euclidean distance (in voxels) of the mask counts as a hit.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 voxels, got {tolerance}")
    r, m = _prepare(attribution, mask, reduce)
    out = np.full(r.shape[0], np.nan)
    for i in range(r.shape[0]):
        if not m[i].any():
            continue
        target = m[i]
        if tolerance > 0:
            target = ndimage.distance_transform_edt(~m[i]) <= tolerance
        top = r[i] == r[i].max()
        out[i] = (top & target).sum() / top.sum()
    return out


def relevance_mass(attribution, mask, reduce: str = "abs") -> np.ndarray:
    """Relevance inside the mask over all relevance; an all-zero map scores the mask fraction."""
    r, m = _prepare(attribution, mask, reduce)
    out = np.full(r.shape[0], np.nan)
    for i in range(r.shape[0]):
        if not m[i].any():
            continue
        total = r[i].sum()
        out[i] = m[i].mean() if total == 0 else r[i][m[i]].sum() / total
    return out


def relevance_rank(attribution, mask, reduce: str = "abs") -> np.ndarray:
    """Share of the K = |mask| highest-relevance voxels that lie in the mask (ties: expected share)."""
    r, m = _prepare(attribution, mask, reduce)
    out = np.full(r.shape[0], np.nan)
    for i in range(r.shape[0]):
        flat, inside = r[i].ravel(), m[i].ravel()
        k = int(inside.sum())
        if k == 0:
            continue
        kth = np.partition(flat, flat.size - k)[flat.size - k]  # the K-th largest value
        above = flat > kth
        tied = flat == kth
        needed = k - int(above.sum())
        hits = (above & inside).sum() + needed * (tied & inside).sum() / tied.sum()
        out[i] = hits / k
    return out


def roc_auc(attribution, mask, reduce: str = "abs") -> np.ndarray:
    """ROC AUC of relevance separating mask voxels from the rest (0.5 = chance, ties count half)."""
    r, m = _prepare(attribution, mask, reduce)
    out = np.full(r.shape[0], np.nan)
    for i in range(r.shape[0]):
        inside = m[i].ravel()
        n_pos = int(inside.sum())
        n_neg = inside.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = stats.rankdata(r[i].ravel())
        out[i] = (ranks[inside].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def localisation_metrics(attribution, mask, tolerance: float = 0.0,
                         reduce: str = "abs") -> dict[str, np.ndarray]:
    """All four localisation metrics: ``{name: (B,) array}``."""
    return {
        "pointing_game": pointing_game(attribution, mask, tolerance, reduce),
        "relevance_mass": relevance_mass(attribution, mask, reduce),
        "relevance_rank": relevance_rank(attribution, mask, reduce),
        "roc_auc": roc_auc(attribution, mask, reduce),
    }


def region_localisation(attribution, regions, names: Sequence[str] = ("ET", "TC", "WT"),
                        tolerance: float = 0.0, reduce: str = "abs") -> dict[str, dict[str, np.ndarray]]:
    """Localisation per region: ``regions`` (B, R, *spatial), one channel per name.

    Returns ``{region name: {metric: (B,) array}}``; a region absent from a case
    (e.g. no enhancing tumour) gives NaN for that case.
    """
    a = as_map(attribution)
    regions = np.asarray(regions.detach().cpu() if hasattr(regions, "detach") else regions)
    if regions.ndim != a.ndim or regions.shape[0] != a.shape[0] or regions.shape[1] != len(names):
        raise ValueError(f"regions must have shape (B, {len(names)}, *spatial) = "
                         f"{(a.shape[0], len(names), *a.shape[2:])} with channels {tuple(names)}, "
                         f"got {regions.shape}")
    return {name: localisation_metrics(a, regions[:, j], tolerance, reduce) for j, name in enumerate(names)}
