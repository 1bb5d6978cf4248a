"""Attribution maps as NIfTI files that overlay on the source scan (3D Slicer, ITK-SNAP)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .volumes import as_numpy

__all__ = ["save_map_nifti", "map_filename"]


def map_filename(target: str, method: str) -> str:
    """``<target>_<method>.nii.gz`` with anything but letters, digits, ``-`` and ``.`` made ``_``."""
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9.\-]+", "_", str(s)).strip("_") or "map"
    return f"{clean(target)}_{clean(method)}.nii.gz"


def save_map_nifti(attribution, meta, path: str | os.PathLike) -> Path:
    """Save one raw map (C, X, Y, Z) in the scan's RAS voxel grid with the scan's header.

    A single-channel map becomes a 3D image; a multi-channel map (one per input
    modality) a 4D image with the channels last. Values are the raw float32
    attributions. Written through :func:`voxplain.data.nifti.save_nifti_like`,
    so the file has the source file's orientation and affine.
    """
    from ..data.nifti import save_nifti_like

    a = as_numpy(attribution)
    if a.ndim != 4:
        raise ValueError(f"a NIfTI map needs shape (C, X, Y, Z), got {a.shape}")
    array = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    path = Path(path)
    save_nifti_like(np.ascontiguousarray(array, dtype=np.float32), meta, path)
    return path
