"""Over-segmentations for XRAI: candidate regions as a sparse (regions x voxels) matrix.

XRAI ranks overlapping candidate regions drawn from several segmentations of
the input. A :class:`RegionSet` stores them as a sparse boolean matrix over
*working voxels* plus the working voxel of every input voxel, so a region at
the input's resolution is the preimage of a region at the working resolution.
2D images follow PAIR ``saliency``: Felzenszwalb at several scales on the image
rescaled to [-1, 1] and resized to 224 x 224, label maps resized back, then each
segment dilated by a disk. 3D volumes use SLIC supervoxels on all channels at
several sizes, computed and dilated (by a ball) on the volume resized so that
its longest axis has ``segment_size`` voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["RegionSet", "footprint_offsets", "dilated_label_masks", "felzenszwalb_regions",
           "slic_regions", "regions_from_segments", "FELZENSZWALB_SCALES", "SLIC_N_SEGMENTS"]

#: PAIR XRAI's Felzenszwalb scales (sigma 0.8, min size 150, on a 224 x 224 image in [-1, 1]).
FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 150
FELZENSZWALB_SIZE = 224
#: Supervoxel counts of the 3D segmentations (on a volume whose longest axis is 64 voxels).
SLIC_N_SEGMENTS = (25, 50, 100, 200, 400)
SLIC_COMPACTNESS = 0.2
SLIC_SIZE = 64


@dataclass
class RegionSet:
    """Candidate regions over working voxels, and how input voxels map onto them.

    Attributes:
        masks: (regions, working voxels) CSR matrix of ones.
        voxel_of: (input voxels,) working voxel of each input voxel (C order), or
            ``None`` when the working voxels are the input voxels.
    """

    masks: sp.csr_matrix
    voxel_of: np.ndarray | None = None

    @property
    def n_regions(self) -> int:
        """Number of candidate regions."""
        return self.masks.shape[0]

    def weights(self) -> np.ndarray:
        """Number of input voxels behind each working voxel (float64)."""
        n = self.masks.shape[1]
        if self.voxel_of is None:
            return np.ones(n)
        return np.bincount(self.voxel_of, minlength=n).astype(np.float64)

    def pool(self, values: np.ndarray) -> np.ndarray:
        """Sum of ``values`` (input voxels, flat) over each working voxel's preimage (float64)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if self.voxel_of is None:
            return values
        return np.bincount(self.voxel_of, weights=values, minlength=self.masks.shape[1])

    def expand(self, values: np.ndarray) -> np.ndarray:
        """Per-working-voxel ``values`` read back at every input voxel (flat)."""
        return values if self.voxel_of is None else values[self.voxel_of]


def footprint_offsets(radius: int, ndim: int) -> np.ndarray:
    """Integer offsets (K, ndim) of the ball ``|o| <= radius`` (skimage's disk / ball)."""
    r = int(radius)
    grid = np.stack(np.meshgrid(*([np.arange(-r, r + 1)] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    return grid[(grid**2).sum(1) <= r * r]


def dilated_label_masks(labels: np.ndarray, radius: int) -> sp.csr_matrix:
    """One row per label present in ``labels`` (ascending): its voxels dilated by a ball of ``radius``.

    Equal to ``skimage.morphology.dilation(labels == l, disk_or_ball(radius))`` for
    every label ``l``; each label is dilated inside its bounding box grown by the radius.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    shape = labels.shape
    values, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(shape).astype(np.int64) + 1  # 1..n for find_objects
    r = int(radius) if radius else 0
    structure = None
    if r > 0:
        structure = np.zeros((2 * r + 1,) * labels.ndim, dtype=bool)
        structure[tuple((footprint_offsets(r, labels.ndim) + r).T)] = True
    index = np.arange(dense.size, dtype=np.int64).reshape(shape)
    rows, cols = [], []
    for k, box in enumerate(ndimage.find_objects(dense)):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, n in zip(box, shape))
        mask = dense[grown] == k + 1
        if structure is not None:
            mask = ndimage.binary_dilation(mask, structure=structure)
        hit = index[grown][mask]
        cols.append(hit)
        rows.append(np.full(len(hit), k, dtype=np.int64))
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(rows_a)), (rows_a, cols_a)), shape=(len(values), dense.size))


def _rescale(image: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    lo, hi = float(np.min(image)), float(np.max(image))
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return scaled * (high - low) + low


def felzenszwalb_regions(image: np.ndarray, scales: Sequence[float] = FELZENSZWALB_SCALES,
                         sigma: float = FELZENSZWALB_SIGMA, min_size: int = FELZENSZWALB_MIN_SIZE,
                         dilation_radius: int = 5, segment_size: int | None = FELZENSZWALB_SIZE) -> RegionSet:
    """PAIR XRAI's 2D candidate regions for ``image`` (C, H, W).

    The image is rescaled to [-1, 1], resized to ``segment_size`` x ``segment_size``
    (cubic, anti-aliased; ``None`` keeps its size), segmented by Felzenszwalb at
    each scale, the label maps resized back (nearest) and every segment dilated
    by a disk of ``dilation_radius`` pixels at the image's resolution.
    """
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    if image.ndim != 3:
        raise ValueError(f"Felzenszwalb segmentation needs a (C, H, W) image, got shape {image.shape}")
    im = _rescale(np.moveaxis(np.asarray(image), 0, -1))
    original = im.shape[:2]
    if segment_size is not None:
        im = resize(im, (segment_size, segment_size), order=3, mode="constant", preserve_range=True,
                    anti_aliasing=True)
    blocks = []
    for scale in scales:
        seg = felzenszwalb(im, scale=scale, sigma=sigma, min_size=min_size)
        if segment_size is not None:
            seg = resize(seg, original, order=0, preserve_range=True, mode="constant",
                         anti_aliasing=False).astype(int)
        blocks.append(dilated_label_masks(seg, dilation_radius))
    return RegionSet(sp.vstack(blocks, format="csr"))


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """For each of ``n_out`` samples, the nearest of ``n_in`` (pixel centres aligned, as skimage)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out)
    return np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)


def slic_regions(volume: np.ndarray, n_segments: Sequence[int] = SLIC_N_SEGMENTS,
                 compactness: float = SLIC_COMPACTNESS, dilation_radius: int = 2,
                 segment_size: int | None = SLIC_SIZE) -> RegionSet:
    """3D candidate regions for ``volume`` (C, X, Y, Z): dilated SLIC supervoxels at several sizes.

    The volume is rescaled to [-1, 1] and resized (linear, anti-aliased, aspect
    kept) so that its longest axis has ``segment_size`` voxels (``None`` keeps its
    size); SLIC runs on all channels for each count in ``n_segments``; each
    supervoxel is dilated by a ball of ``dilation_radius`` working voxels. Input
    voxels map to their nearest working voxel.
    """
    from skimage.segmentation import slic
    from skimage.transform import resize

    if volume.ndim != 4:
        raise ValueError(f"supervoxel segmentation needs a (C, X, Y, Z) volume, got shape {volume.shape}")
    vol = _rescale(np.moveaxis(np.asarray(volume, dtype=np.float64), 0, -1))
    spatial = vol.shape[:3]
    work = spatial
    if segment_size is not None:
        factor = segment_size / max(spatial)
        work = tuple(max(1, int(round(n * factor))) for n in spatial)
        if work != spatial:
            vol = resize(vol, work + vol.shape[3:], order=1, mode="edge", preserve_range=True,
                         anti_aliasing=factor < 1)
    blocks = []
    for count in n_segments:
        seg = slic(vol, n_segments=int(count), compactness=compactness, channel_axis=-1, start_label=0)
        blocks.append(dilated_label_masks(seg, dilation_radius))
    masks = sp.vstack(blocks, format="csr")
    if work == spatial:
        return RegionSet(masks)
    axes = [_nearest_index(n, w) for n, w in zip(spatial, work)]
    voxel_of = np.ravel_multi_index(np.meshgrid(*axes, indexing="ij"), work).ravel()
    return RegionSet(masks, voxel_of)


def regions_from_segments(segments, spatial: tuple[int, ...]) -> RegionSet:
    """Regions given by the user: an integer label map, or a list of boolean masks / label maps.

    Each must have the input's spatial shape; a label map contributes one region
    per label present. Precomputed segments are used as given (not dilated).
    """
    try:
        import torch

        def as_array(s):
            return s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
    except ImportError:  # pragma: no cover
        as_array = np.asarray
    items = [segments] if not isinstance(segments, (list, tuple)) else list(segments)
    if not items:
        raise ValueError("xrai segments: got an empty list; give boolean masks or an integer label map")
    first = as_array(items[0])
    if len(items) == 1 and first.dtype == bool and first.ndim == len(spatial) + 1:
        items = list(first)  # a stacked (regions, *spatial) boolean array
    blocks = []
    for k, item in enumerate(items):
        arr = as_array(item)
        if tuple(arr.shape) != tuple(spatial):
            raise ValueError(f"xrai segments: each mask or label map must have the input's spatial shape "
                             f"{tuple(spatial)}, got shape {tuple(arr.shape)} (item {k})")
        if arr.dtype == bool:
            flat = np.flatnonzero(arr.ravel())
            blocks.append(sp.csr_matrix((np.ones(len(flat)), (np.zeros(len(flat), dtype=np.int64), flat)),
                                        shape=(1, arr.size)))
        elif np.issubdtype(arr.dtype, np.integer):
            blocks.append(dilated_label_masks(arr, 0))
        else:
            raise ValueError(f"xrai segments: expected boolean masks or integer label maps, got dtype "
                             f"{arr.dtype} (item {k})")
    return RegionSet(sp.vstack(blocks, format="csr"))
