"""Preprocessing of brain MRI as in the BraTS papers: z-score, crop or pad, label regions.

* :func:`zscore_nonzero` normalises each modality over its brain (non-zero) voxels.
* :func:`crop_or_pad` cuts or zero-pads the spatial axes to a fixed size around a
  centre; :class:`CropBox` remembers how, so a map computed on the cropped array
  can be put back on the original grid (:meth:`CropBox.restore`).
* :func:`default_crop_size`: the papers' 192 x 224 x 160 mm box at 1 mm; at a
  coarser voxel size the same extent in voxels, rounded up to a multiple of 16 so
  that a 4-level U-Net divides it evenly: 96 x 112 x 80 at 2 mm, 64 x 80 x 64 at 3 mm.
* :func:`labels_to_regions`: BraTS labels (1 necrotic/non-enhancing core, 2 oedema,
  4 enhancing) to the overlapping evaluation regions, channels in :data:`REGIONS`
  order (TC, WT, ET), the order of MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``
  and the default of :class:`voxplain.targets.BratsRegionTarget`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..targets import BRATS_LABELS

__all__ = ["REGIONS", "BRATS_LABELS", "zscore_nonzero", "crop_or_pad", "CropBox", "crop_box",
           "foreground_centre", "default_crop_size", "labels_to_regions", "PAPER_CROP_MM"]

#: channel order of :func:`labels_to_regions` (MONAI's BraTS order)
REGIONS = ("TC", "WT", "ET")

#: the crop of the BraTS papers, in voxels at 1 mm
PAPER_CROP_MM = (192, 224, 160)


def zscore_nonzero(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score each channel of a (C, *spatial) image over its non-zero voxels (or ``mask``).

    Voxels outside stay 0, so the background of a skull-stripped scan stays at the
    brain's mean. A channel that is constant inside the mask becomes 0 there.
    Returns float32.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim < 2:
        raise ValueError(f"expected a (C, *spatial) image, got shape {image.shape}")
    out = np.zeros_like(image)
    for c in range(image.shape[0]):
        inside = image[c] != 0 if mask is None else np.asarray(mask, bool)
        if inside.shape != image.shape[1:]:
            raise ValueError(f"mask shape {inside.shape} does not match the image's spatial shape {image.shape[1:]}")
        values = image[c][inside].astype(np.float64)
        if values.size == 0:
            continue
        std = values.std()
        out[c][inside] = ((values - values.mean()) / std if std > 0 else 0.0)
    return out


def default_crop_size(resolution: float = 1.0) -> tuple[int, int, int]:
    """Crop size for a voxel size in mm: 192 x 224 x 160 at 1 mm, coarser grids scaled and rounded up to x16."""
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive voxel size in mm, got {resolution}")
    if math.isclose(resolution, 1.0):
        return PAPER_CROP_MM
    return tuple(int(16 * math.ceil(n / resolution / 16 - 1e-6)) for n in PAPER_CROP_MM)


@dataclass(frozen=True)
class CropBox:
    """How :func:`crop_or_pad` mapped a grid of ``source_shape`` onto one of ``size``.

    ``start[i]`` is the source index of output index 0 along spatial axis ``i``
    (negative where the output is padded before the source).
    """

    source_shape: tuple[int, ...]
    size: tuple[int, ...]
    start: tuple[int, ...]

    def _slices(self):
        src, dst = [], []
        for n, s, a in zip(self.source_shape, self.size, self.start):
            lo, hi = max(a, 0), min(a + s, n)
            src.append(slice(lo, max(hi, lo)))
            dst.append(slice(lo - a, lo - a + max(hi - lo, 0)))
        return tuple(src), tuple(dst)

    def apply(self, array, fill: float = 0.0):
        """Crop/pad the last ``len(size)`` axes of ``array`` (numpy or torch)."""
        lead = tuple(array.shape[:-len(self.size)])
        if tuple(array.shape[-len(self.size):]) != self.source_shape:
            raise ValueError(f"expected spatial shape {self.source_shape}, got {tuple(array.shape[-len(self.size):])}")
        src, dst = self._slices()
        out = _full_like(array, lead + self.size, fill)
        out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
        return out

    def restore(self, array, fill: float = 0.0):
        """Put an array of the cropped ``size`` back on the source grid (``fill`` where it was cut)."""
        lead = tuple(array.shape[:-len(self.size)])
        if tuple(array.shape[-len(self.size):]) != self.size:
            raise ValueError(f"expected spatial shape {self.size}, got {tuple(array.shape[-len(self.size):])}")
        src, dst = self._slices()
        out = _full_like(array, lead + self.source_shape, fill)
        out[(Ellipsis,) + src] = array[(Ellipsis,) + dst]
        return out


def _full_like(array, shape, fill):
    if hasattr(array, "new_full"):  # torch tensor
        return array.new_full(shape, fill)
    return np.full(shape, fill, dtype=np.asarray(array).dtype)


def foreground_centre(array: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Centre of the bounding box of non-zero voxels (any channel) over the last ``ndim`` axes."""
    array = np.asarray(array)
    fg = array != 0
    if array.ndim > ndim:
        fg = fg.reshape((-1,) + array.shape[-ndim:]).any(axis=0)
    if not fg.any():
        return tuple((n - 1) / 2 for n in fg.shape)
    where = np.argwhere(fg)
    return tuple((lo + hi) / 2 for lo, hi in zip(where.min(0), where.max(0)))


def crop_box(source_shape: Sequence[int], size: Sequence[int], centre: Sequence[float] | None = None) -> CropBox:
    """The :class:`CropBox` taking ``size`` voxels around ``centre`` (default: the grid centre)."""
    source_shape, size = tuple(int(n) for n in source_shape), tuple(int(n) for n in size)
    if len(source_shape) != len(size) or any(n < 1 for n in size):
        raise ValueError(f"crop size {size} must give one positive length per spatial axis of {source_shape}")
    if centre is None:
        centre = tuple((n - 1) / 2 for n in source_shape)
    start = tuple(int(math.floor(c - (s - 1) / 2 + 0.5)) for c, s in zip(centre, size))
    return CropBox(source_shape, size, start)


def crop_or_pad(array, size: Sequence[int], centre: Sequence[float] | str | None = None,
                fill: float = 0.0, return_box: bool = False):
    """Crop or zero-pad the last ``len(size)`` axes of ``array`` to ``size``.

    ``centre`` (voxel coordinates of the spatial axes) is the point that lands in the
    middle; ``None`` means the grid centre, ``"foreground"`` the centre of the
    non-zero voxels' bounding box (keeps a skull-stripped brain whole). With
    ``return_box`` also returns the :class:`CropBox` to undo it.
    """
    size = tuple(int(n) for n in size)
    spatial = tuple(array.shape[-len(size):])
    if isinstance(centre, str):
        if centre != "foreground":
            raise ValueError(f"centre must be None, 'foreground' or voxel coordinates, got {centre!r}")
        data = array.detach().cpu().numpy() if hasattr(array, "detach") else array
        centre = foreground_centre(data, len(size))
    box = crop_box(spatial, size, centre)
    out = box.apply(array, fill)
    return (out, box) if return_box else out


def labels_to_regions(seg, regions: Sequence[str] = REGIONS) -> np.ndarray:
    """BraTS labels (*spatial) to float32 region channels (len(regions), *spatial), default (TC, WT, ET).

    ET = label 4, TC = labels 1 and 4, WT = labels 1, 2 and 4.
    """
    seg = np.asarray(seg)
    names = [r.upper() for r in regions]
    unknown = [r for r in names if r not in BRATS_LABELS]
    if unknown:
        raise ValueError(f"unknown BraTS region(s) {unknown}; expected some of {tuple(BRATS_LABELS)}")
    return np.stack([np.isin(seg, BRATS_LABELS[r]) for r in names]).astype(np.float32)
