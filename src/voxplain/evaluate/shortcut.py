"""Did the model learn the shortcut? Share of attribution on a spurious marker.

The phantom cohort (:mod:`voxplain.data.phantom`) can add a small bright ball at a
fixed place in world (MNI) coordinates more often to high-grade subjects; a
model may learn that marker instead of the tumour. :func:`marker_share` measures
how much of a map's relevance (absolute, channels summed) falls on the marker:

* ``share``: relevance on the marker over all relevance (relevance mass);
* ``enrichment``: share divided by the marker's volume fraction (1 = no more
  than chance, 10 = ten times more relevance per voxel than average).

Degenerate input: an all-zero map has share equal to the marker's volume
fraction (enrichment 1); an empty marker mask gives NaN for both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._checks import as_map, as_mask
from .localisation import relevance_mass

__all__ = ["marker_share", "marker_mask", "cohort_marker"]


def marker_mask(shape: Sequence[int], affine: np.ndarray, centre_mm: Sequence[float],
                radius_mm: float) -> np.ndarray:
    """Bool mask (*shape) of the voxels whose centres lie within ``radius_mm`` of ``centre_mm``.

    ``affine`` maps voxel indices of the array to world mm (4x4, as in NIfTI).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}")
    if len(shape) != 3 or len(centre_mm) != 3:
        raise ValueError(f"marker_mask works on 3D volumes with a 3D centre, got shape {tuple(shape)} "
                         f"and centre {tuple(centre_mm)}")
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    d = np.linalg.norm(world - np.asarray(centre_mm, dtype=np.float64), axis=1)
    return (d <= radius_mm).reshape(tuple(shape))


def cohort_marker(cohort_dir: str | os.PathLike) -> tuple[tuple[float, float, float], float] | None:
    """The marker's centre (mm) and radius (mm) recorded in a phantom cohort's ``cohort.json``.

    ``None`` if the file does not exist or the cohort was made without a marker.
    """
    path = Path(cohort_dir) / "cohort.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    probs = info.get("shortcut") or [0.0, 0.0]
    if not any(float(p) > 0 for p in probs) or "shortcut_mm" not in info:
        return None
    return tuple(float(v) for v in info["shortcut_mm"]), float(info.get("shortcut_radius_mm", 5.0))


def marker_share(attribution, marker, reduce: str = "abs") -> dict[str, np.ndarray]:
    """``{"share": (B,), "enrichment": (B,)}`` of a map (B, C, *spatial) on a marker mask."""
    a = as_map(attribution)
    m = as_mask(marker, tuple(a.shape[2:]), a.shape[0], "marker mask").numpy()
    share = relevance_mass(a, m, reduce)
    frac = m.reshape(m.shape[0], -1).mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        enrichment = np.where(frac > 0, share / np.where(frac > 0, frac, 1.0), np.nan)
    return {"share": share, "enrichment": enrichment}
