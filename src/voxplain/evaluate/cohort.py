"""Cases to evaluate from a BraTS-layout cohort (real BraTS or the phantom) or a 2D image folder.

Cohort cases are loaded like the models were trained on them
(:class:`voxplain.data.datasets.BratsCohortDataset`: z-score per modality,
crop/pad around the brain); their ground truth is the segmentation as region
masks in :data:`voxplain.data.preprocess.REGIONS` order (TC, WT, ET), cropped
the same way, and, for phantom cohorts made with a shortcut marker, the
marker's ball (from ``cohort.json``) on cases that carry it (``subjects.csv``).
Image-folder samples have no masks: only faithfulness, PIC, complexity and
randomisation apply.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..targets import BratsRegionTarget, ClassTarget
from .runner import EvalCase
from .shortcut import cohort_marker, marker_mask

__all__ = ["cohort_cases", "image_folder_cases", "count_cohort_cases", "POOLS"]

#: what a segmentation region's channel can be averaged over (as ``voxplain explain --region``)
POOLS = ("predicted", "all", "label")


def _dataset(root, task: str, size, spacing=None, orientation=None, modalities=None):
    from ..data.brats import MODALITIES
    from ..data.datasets import BratsCohortDataset

    return BratsCohortDataset(root, task="grade" if task == "classify" else "segment",
                              size=None if size is None else tuple(size), spacing=spacing, orientation=orientation,
                              modalities=tuple(modalities or MODALITIES))


def count_cohort_cases(root: str | os.PathLike, task: str = "classify", size: Sequence[int] | None = None) -> int:
    """How many cases :func:`cohort_cases` can yield."""
    return len(_dataset(root, task, size))


def cohort_cases(root: str | os.PathLike, task: str = "classify", size: Sequence[int] | None = None,
                 region: str = "WT", region_channels: Sequence[str] | None = None,
                 limit: int | None = None, pool: str = "predicted", spacing: float | Sequence[float] | None = None,
                 orientation: str | None = None, modalities: Sequence[str] | None = None) -> Iterator[EvalCase]:
    """Yield :class:`EvalCase` objects, one per case, loaded lazily.

    Args:
        task: ``"classify"`` (grade; explains the predicted class) or ``"segment"``
            (explains BraTS region ``region`` of a region-channel model whose channels
            are ``region_channels``, default TC, WT, ET).
        size: crop size the model expects (default: the dataset's default for the voxel size).
        limit: at most this many cases (in the cohort's order).
        pool: what the region's channel is averaged over: ``"predicted"`` (the voxels the
            model predicts as the region), ``"all"`` (every voxel, NeuroXAI) or ``"label"``
            (the case's ground truth of the region). An empty region skips the case.
        spacing, orientation: the model's voxel grid; cases (and their masks, nearest
            neighbour) are resampled to it first.
        modalities: the input channels in the model's order (default t1, t1ce, t2, flair).
    """
    from ..data.brats import read_subjects_table
    from ..data.preprocess import REGIONS, labels_to_regions

    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    ds = _dataset(root, task, size, spacing, orientation, modalities)
    marker_info = cohort_marker(root)
    table = read_subjects_table(root) if marker_info is not None else {}
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        image, _ = ds[i]
        case = ds.case(i)
        box, mapping = ds.crop_box(i), ds.mapping(i)
        seg, shape, affine, zooms = case.seg, case.shape, case.meta.ras_affine, tuple(case.meta.zooms)
        if mapping is not None:  # on the model's grid: labels by nearest neighbour
            seg = None if seg is None else mapping.to_target(seg, kind="label")
            shape, affine = mapping.target_shape, mapping.target_affine
            zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        regions = None
        if seg is not None:
            regions = torch.from_numpy(np.ascontiguousarray(labels_to_regions(box.apply(seg))))
        marker = None
        if marker_info is not None and str(table.get(case.name, {}).get("shortcut", "0")) in ("1", "True", "true"):
            full = marker_mask(shape, affine, marker_info[0], marker_info[1])
            marker = np.asarray(box.apply(full.astype(np.float32))) > 0.5
        if task == "classify":
            target = ClassTarget(None)
        else:
            over = {"predicted": "predicted", "all": None}.get(pool)
            if pool == "label":
                over = (regions[list(REGIONS).index(region)] if regions is not None
                        else torch.zeros(tuple(image.shape[1:]), dtype=torch.bool))  # no ground truth: skipped
            target = BratsRegionTarget(region, layout="regions", channels=tuple(region_channels or REGIONS),
                                       region=over)
        yield EvalCase(case.name, image, target, regions, tuple(REGIONS), marker, zooms)


def image_folder_cases(root: str | os.PathLike, size: Sequence[int] = (64, 64), channels: int = 1,
                       limit: int | None = None) -> Iterator[EvalCase]:
    """Yield the images of a class-per-folder image folder (no ground-truth masks)."""
    from ..data.datasets import ImageFolderDataset

    ds = ImageFolderDataset(root, size=tuple(size), channels=channels)
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        image, _ = ds[i]
        yield EvalCase(ds.names[i], image, ClassTarget(None))
