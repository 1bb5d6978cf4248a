"""The MNI152 2009 template that nilearn ships offline, as tissue maps at 1, 2 or 3 mm.

nilearn bundles the skull-stripped ICBM152 2009a T1 template and its grey and
white matter probability maps at 1 mm (no download). Coarser grids are made here
by smoothing and subsampling, on the same grid (origin, spacing, shape) as
``nilearn.datasets.load_mni152_template(resolution)`` but without its slow
spline resampling.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["Template", "load_template", "RESOLUTIONS"]

#: voxel sizes (mm) the template can be built at
RESOLUTIONS = (1, 2, 3)

#: nilearn's threshold on the rescaled T1 template for its brain mask
_MASK_THRESHOLD = 0.2

#: the 1 mm template files bundled with nilearn (used by its load_mni152_* functions)
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Template:
    """Tissue maps of the MNI152 template on one grid, all float32 arrays of ``shape``.

    ``gm``, ``wm`` and ``csf`` are tissue probabilities (CSF = brain mask minus
    grey and white matter); ``mask`` is the brain mask (bool), nilearn's threshold
    of the T1 template; ``affine`` the voxel-to-MNI-mm matrix.
    """

    resolution: int
    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (X, Y, Z)."""
        return tuple(self.mask.shape)

    def voxel(self, mm) -> np.ndarray:
        """Voxel coordinates (float) of a point given in MNI millimetres."""
        return (np.linalg.inv(self.affine) @ np.append(np.asarray(mm, float), 1.0))[:3]

    def mm(self, voxel) -> np.ndarray:
        """MNI millimetres of a voxel coordinate."""
        return (self.affine @ np.append(np.asarray(voxel, float), 1.0))[:3]


def _downsample(volume: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth (FWHM about one output voxel) and keep every ``factor``-th voxel, zero-padded to ``shape``."""
    if factor == 1:
        return volume.astype(np.float32)
    offsets = np.arange(-factor, factor + 1)
    weights = np.exp(-0.5 * (offsets / (0.42 * factor)) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    sub = volume.astype(np.float32)
    for axis in range(3):
        # the kernel is only evaluated at the kept voxels: a weighted sum of strided shifted views
        pad = [(0, 0)] * 3
        pad[axis] = (factor, factor)
        padded = np.pad(sub, pad)
        n_out = -(-sub.shape[axis] // factor)
        acc = 0.0
        for off, w in zip(offsets, weights):
            start = factor + off
            index = [slice(None)] * 3
            index[axis] = slice(start, start + factor * n_out, factor)
            acc = acc + w * padded[tuple(index)]
        sub = acc
    out = np.zeros(shape, np.float32)
    out[tuple(slice(0, s) for s in sub.shape)] = sub
    return out


def _nilearn_file(name: str) -> Path:
    """Path of a file in nilearn's package data, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("the phantom needs nilearn's bundled MNI152 template: pip install nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's MNI152 template file is missing: {path}")
    return path


def _unit_max(img) -> np.ndarray:
    """Image data as float32 scaled so that its maximum is 1 (as nilearn's template loaders do)."""
    data = np.asarray(img.dataobj, np.float32)
    data /= data.max()
    return data


@functools.lru_cache(maxsize=3)
def load_template(resolution: int = 2) -> Template:
    """The MNI152 2009 template's tissue maps at ``resolution`` mm (1, 2 or 3); cached per process.

    The affine equals nilearn's ``load_mni152_template(resolution).affine``. Nothing
    is downloaded: the 1 mm maps are read from nilearn's package data.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} (mm), got {resolution!r}")
    t1_img = nib.load(_nilearn_file(_FILES["t1"]))
    t11 = _unit_max(t1_img)
    gm1 = _unit_max(nib.load(_nilearn_file(_FILES["gm"])))
    wm1 = _unit_max(nib.load(_nilearn_file(_FILES["wm"])))
    mask1 = (t11 > _MASK_THRESHOLD).astype(np.float32)

    # nilearn's grid for a coarser resolution: same origin, spacing r, covering the 1 mm box
    shape = tuple(math.ceil((n - 1) / resolution) + 1 for n in t11.shape)
    affine = np.array(t1_img.affine, dtype=float)
    affine[:3, :3] = affine[:3, :3] * resolution

    gm = _downsample(gm1 * mask1, resolution, shape)
    wm = _downsample(wm1 * mask1, resolution, shape)
    mask = _downsample(mask1, resolution, shape) > 0.5
    total = gm + wm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale * mask, wm * scale * mask
    csf = np.clip(mask.astype(np.float32) - gm - wm, 0.0, 1.0)
    for a in (gm, wm, csf):
        a.setflags(write=False)
    mask.setflags(write=False)
    affine.setflags(write=False)
    return Template(resolution=resolution, affine=affine, gm=gm.astype(np.float32),
                    wm=wm.astype(np.float32), csf=csf.astype(np.float32), mask=mask)
