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
from typing import Any

import numpy as np
import torch

from ..targets import BratsRegionTarget, ClassTarget
from .runner import EvalCase
from .shortcut import cohort_marker, marker_mask

__all__ = ["cohort_cases", "image_folder_cases", "count_cohort_cases", "CohortReader",
           "ImageFolderReader", "READERS", "POOLS"]

#: what a segmentation region's channel can be averaged over (as ``voxplain explain --region``)
POOLS = ("predicted", "all", "label")


def _dataset(root, task: str, size, cache: bool = True, spacing=None, orientation=None, modalities=None):
    from ..data.brats import MODALITIES
    from ..data.datasets import BratsCohortDataset

    return BratsCohortDataset(root, task="grade" if task == "classify" else "segment",
                              size=None if size is None else tuple(size), cache=cache, spacing=spacing,
                              orientation=orientation, modalities=tuple(modalities or MODALITIES))


def count_cohort_cases(root: str | os.PathLike, task: str = "classify", size: Sequence[int] | None = None) -> int:
    """How many cases :func:`cohort_cases` can yield."""
    return len(_dataset(root, task, size))


class _IndexedReader:
    """Cases read one by one by index from ``self.dataset`` (which has ``names`` and a length)."""

    dataset: Any

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def names(self) -> list[str]:
        """The cases' names, in order (nothing is loaded)."""
        return list(self.dataset.names)

    def case(self, i: int) -> EvalCase:  # pragma: no cover - every reader defines it
        raise NotImplementedError

    def first(self, limit: int | None = None) -> Iterator[EvalCase]:
        """The cases in order, loaded one at a time; at most ``limit`` of them."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            yield self.case(i)


class CohortReader(_IndexedReader):
    """The cases of a BraTS-layout cohort one by one, by index: :func:`cohort_cases` and Dask workers read through it.

    Arguments as :func:`cohort_cases`; ``cache`` keeps loaded cases in memory (each is read once
    when going through a cohort, so it is off by default).
    """

    def __init__(self, root: str | os.PathLike, task: str = "classify", size: Sequence[int] | None = None,
                 region: str = "WT", region_channels: Sequence[str] | None = None, cache: bool = False,
                 pool: str = "predicted", spacing: float | Sequence[float] | None = None,
                 orientation: str | None = None, modalities: Sequence[str] | None = None):
        from ..data.brats import read_subjects_table

        if task not in ("classify", "segment"):
            raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.dataset = _dataset(root, task, size, cache, spacing, orientation, modalities)
        self.task, self.region, self.pool = task, region, pool
        self.region_channels = None if region_channels is None else tuple(region_channels)
        self.marker_info = cohort_marker(root)
        self.table = read_subjects_table(root) if self.marker_info is not None else {}

    def case(self, i: int) -> EvalCase:
        """Case ``i`` with its target, ground-truth regions and shortcut marker."""
        from ..data.preprocess import REGIONS, labels_to_regions

        ds = self.dataset
        image, _, box, mapping = ds.item(i)
        case = ds.case(i)
        seg, shape, affine, zooms = case.seg, case.shape, case.meta.ras_affine, tuple(case.meta.zooms)
        if mapping is not None:  # on the model's grid: labels by nearest neighbour
            seg = None if seg is None else mapping.to_target(seg, kind="label")
            shape, affine = mapping.target_shape, mapping.target_affine
            zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        regions = None
        if seg is not None:
            regions = torch.from_numpy(np.ascontiguousarray(labels_to_regions(box.apply(seg))))
        marker = None
        if self.marker_info is not None and str(self.table.get(case.name, {}).get("shortcut", "0")) in (
                "1", "True", "true"):
            full = marker_mask(shape, affine, self.marker_info[0], self.marker_info[1])
            marker = np.asarray(box.apply(full.astype(np.float32))) > 0.5
        if self.task == "classify":
            target = ClassTarget(None)
        else:
            over = {"predicted": "predicted", "all": None}.get(self.pool)
            if self.pool == "label":
                over = (regions[list(REGIONS).index(self.region)] if regions is not None
                        else torch.zeros(tuple(image.shape[1:]), dtype=torch.bool))  # no ground truth: skipped
            target = BratsRegionTarget(self.region, layout="regions",
                                       channels=tuple(self.region_channels or REGIONS), region=over)
        return EvalCase(case.name, image, target, regions, tuple(REGIONS), marker, zooms)


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
    yield from CohortReader(root, task, size, region, region_channels, pool=pool, spacing=spacing,
                            orientation=orientation, modalities=modalities).first(limit)


class ImageFolderReader(_IndexedReader):
    """The images of a class-per-folder image folder one by one, by index (as :func:`image_folder_cases` yields them)."""

    def __init__(self, root: str | os.PathLike, size: Sequence[int] = (64, 64), channels: int = 1):
        from ..data.datasets import ImageFolderDataset

        self.dataset = ImageFolderDataset(root, size=tuple(size), channels=channels)

    def case(self, i: int) -> EvalCase:
        """Image ``i`` (no ground truth)."""
        image, _ = self.dataset[i]
        return EvalCase(self.dataset.names[i], image, ClassTarget(None))


def image_folder_cases(root: str | os.PathLike, size: Sequence[int] = (64, 64), channels: int = 1,
                       limit: int | None = None) -> Iterator[EvalCase]:
    """Yield the images of a class-per-folder image folder (no ground-truth masks)."""
    yield from ImageFolderReader(root, size, channels).first(limit)


#: the case readers by name: ``"brats"`` (a BraTS-layout cohort) and ``"images"`` (an image folder)
READERS = {"brats": CohortReader, "images": ImageFolderReader}
