"""How concentrated is a map? Sparseness (Gini index) and entropy.

Both work on the map's absolute voxel relevance (channels summed, see
:func:`voxel_relevance`) and return a float64 numpy array (B,).

* :func:`sparseness`: Gini index of the sorted relevances (Chalasani et al. 2020):
  0 for a uniform map, towards 1 when one voxel holds everything. Higher = sparser.
* :func:`entropy`: Shannon entropy (nats) of the relevance normalised to a
  distribution; ``normalise=True`` divides by log(number of voxels) so it lies in
  [0, 1]. Lower = more concentrated.

Degenerate input: an all-zero map is treated as uniform (no voxel preferred):
sparseness 0, entropy log(n) (1 when normalised). A single voxel gives
sparseness 0 and entropy 0.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_map, voxel_relevance

__all__ = ["sparseness", "entropy", "complexity_metrics"]


def _relevance(attribution) -> np.ndarray:
    r = voxel_relevance(as_map(attribution), "abs").double().numpy()
    return r.reshape(r.shape[0], -1)


def sparseness(attribution) -> np.ndarray:
    """Gini index of |relevance| per sample, in [0, 1)."""
    r = np.sort(_relevance(attribution), axis=1)
    n = r.shape[1]
    total = r.sum(axis=1)
    k = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gini = ((2 * k - n - 1) * r).sum(axis=1) / (n * total)
    return np.where(total > 0, gini, 0.0)


def entropy(attribution, normalise: bool = False) -> np.ndarray:
    """Shannon entropy of |relevance| / sum(|relevance|) per sample (nats, or in [0, 1] if normalised)."""
    r = _relevance(attribution)
    n = r.shape[1]
    total = r.sum(axis=1, keepdims=True)
    p = np.where(total > 0, r / np.where(total > 0, total, 1), 1.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    if normalise:
        h = h / np.log(n) if n > 1 else np.zeros_like(h)
    return h


def complexity_metrics(attribution) -> dict[str, np.ndarray]:
    """``{"sparseness": (B,), "entropy": (B,)}`` (entropy normalised to [0, 1])."""
    return {"sparseness": sparseness(attribution), "entropy": entropy(attribution, normalise=True)}
