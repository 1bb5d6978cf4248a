"""torch Datasets over BraTS-like cohorts and image folders, and a seeded train/validation split.

* :class:`BratsCohortDataset`: whole cases, (4, X, Y, Z) z-scored and cropped, with
  a grade label (LGG 0, HGG 1), a tumour/no-tumour label, or region masks (TC, WT, ET).
* :class:`SliceDataset`: 2D slices of a cohort, (4, H, W), labelled tumour (1) or
  no tumour (0) from the segmentation.
* :class:`ImageFolderDataset`: a 2D image folder with one sub-folder per class.

Every dataset exposes ``labels`` (class per item, None for segmentation) and
``groups`` (the case of each item) for :func:`split_indices` / :func:`train_val_split`,
which keep all items of a case on one side of the split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .brats import MODALITIES, BratsCase, find_brats_cases, load_brats_case, read_subjects_table
from .images import find_images, load_image
from .preprocess import REGIONS, CropBox, crop_or_pad, default_crop_size, foreground_centre, labels_to_regions, \
    zscore_nonzero

__all__ = ["BratsCohortDataset", "SliceDataset", "ImageFolderDataset", "split_indices", "train_val_split",
           "GRADE_CLASSES", "TUMOUR_CLASSES"]

#: class names of the grade task (index = label)
GRADE_CLASSES = ("LGG", "HGG")
#: class names of the tumour presence tasks
TUMOUR_CLASSES = ("no tumour", "tumour")
_TASKS = ("grade", "tumour", "segment")


def _voxel_size(case: BratsCase) -> float:
    return float(np.mean(case.meta.zooms))


class BratsCohortDataset(Dataset):
    """Cases of a BraTS-layout cohort (real BraTS or :mod:`voxplain.data.phantom`) as 3D samples.

    Each item is ``(image, target)``: ``image`` float32 (4, *size) z-scored per
    modality over the brain and cropped/padded around the brain's centre;
    ``target`` depends on ``task``:

    * ``"grade"``: int64 class, 0 = LGG, 1 = HGG (from ``subjects.csv`` or BraTS
      2020's ``name_mapping.csv``; cases without a grade, e.g. healthy, are left out);
    * ``"tumour"``: int64, 1 if the segmentation has tumour voxels;
    * ``"segment"``: float32 (3, *size) region masks in :data:`REGIONS` order (TC, WT, ET).

    ``size`` None crops to :func:`default_crop_size` of the cases' voxel size;
    pass the grid's own shape to keep it whole. With ``cache`` (default) loaded
    items stay in memory (about 14 MB per case at 2 mm). ``spacing`` (mm) and
    ``orientation`` (e.g. ``"RAS"``) resample every case first (a model's training
    grid; :func:`voxplain.data.resample.resample_to_spacing`: images linear,
    segmentations nearest neighbour); :meth:`mapping` gives the way back.
    """

    def __init__(self, root: str | os.PathLike, task: str = "grade", size: Sequence[int] | None = None,
                 modalities: Sequence[str] = MODALITIES, cache: bool = True,
                 spacing: float | Sequence[float] | None = None, orientation: str | None = None):
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        self.root, self.task, self.modalities = Path(root), task, tuple(modalities)
        cases = find_brats_cases(self.root)
        if not cases:
            raise ValueError(f"{self.root}: no BraTS case folders (sub-folders with NAME_t1/t1ce/t2/flair files)")
        self.labels: list[int] | None = None
        if task == "grade":
            table = read_subjects_table(self.root)
            if not table:
                raise ValueError(f"{self.root}: the grade task needs subjects.csv (phantom) or name_mapping.csv "
                                 "(BraTS 2020) with a grade per case")
            kept = [(c, table.get(c.name, {}).get("grade", "").upper()) for c in cases]
            kept = [(c, g) for c, g in kept if g in GRADE_CLASSES]
            if not kept:
                raise ValueError(f"{self.root}: no case has grade HGG or LGG in its table")
            cases = [c for c, _ in kept]
            self.labels = [GRADE_CLASSES.index(g) for _, g in kept]
        self.cases = cases
        self.names = [c.name for c in cases]
        self.groups = list(range(len(cases)))
        self.size = None if size is None else tuple(int(n) for n in size)
        self.spacing, self.orientation = spacing, orientation
        self.class_names = list(GRADE_CLASSES if task == "grade" else TUMOUR_CLASSES) if task != "segment" else None
        self.region_names = list(REGIONS)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, CropBox]] | None = {} if cache else None
        if task == "tumour":
            self.labels = [int(self._load(i)[1]) for i in range(len(cases))]

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, index: int) -> BratsCase:
        """The full-size :class:`BratsCase` behind item ``index`` (for saving maps aligned with it)."""
        return load_brats_case(self.cases[index], self.modalities, require_seg=self.task != "grade")

    def crop_box(self, index: int) -> CropBox:
        """How item ``index`` was cut from its case (``restore`` puts a map back on the case's (resampled) grid)."""
        return self._load(index)[2]

    def mapping(self, index: int):
        """The :class:`~voxplain.data.resample.GridMapping` from item ``index``'s case to its resampled grid,
        or None when the case is used on its own grid."""
        return self._load(index)[3]

    def _load(self, index: int):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        case = self.case(index)
        raw, seg, mapping, voxel = case.image, case.seg, None, _voxel_size(case)
        if self.spacing is not None or self.orientation is not None:
            from .resample import resample_to_spacing

            resampled, affine, mapping = resample_to_spacing(raw, case.meta.ras_affine, self.spacing,
                                                             self.orientation, kind="map")
            if mapping.is_identity:
                mapping = None
            else:
                raw = resampled
                seg = None if seg is None else mapping.to_target(seg, kind="label")
                voxel = float(np.mean(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
        size = self.size or default_crop_size(voxel)
        image, box = crop_or_pad(zscore_nonzero(raw), size, centre=foreground_centre(raw), return_box=True)
        if self.task == "grade":
            target = torch.tensor(self.labels[index], dtype=torch.int64)
        elif self.task == "tumour":
            target = torch.tensor(int((seg > 0).any()), dtype=torch.int64)
        else:
            target = torch.from_numpy(labels_to_regions(box.apply(seg)))
        item = (torch.from_numpy(np.ascontiguousarray(image)), target, box, mapping)
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        image, target = self._load(index % len(self))[:2]
        return image, target


class SliceDataset(Dataset):
    """2D slices of a BraTS-layout cohort labelled by the segmentation: 1 tumour, 0 no tumour.

    Each item is ``(image float32 (4, H, W), int64 label)``; the volume is z-scored
    per modality over its brain voxels, then slices along ``axis`` (2 = axial) are
    cropped/padded in-plane to ``size`` (default: the in-plane part of
    :func:`default_crop_size`). Kept slices show at least ``min_brain_fraction`` of
    the case's largest brain cross-section; a slice is "tumour" with at least
    ``min_tumour_mm2`` of tumour, "no tumour" with none, and left out in between
    (too little to call). ``stride`` keeps every n-th slice.
    """

    def __init__(self, root: str | os.PathLike, size: Sequence[int] | None = None, axis: int = 2,
                 modalities: Sequence[str] = MODALITIES, min_brain_fraction: float = 0.25,
                 min_tumour_mm2: float = 40.0, stride: int = 1):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        if int(stride) < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        self.root, self.axis, self.modalities = Path(root), axis, tuple(modalities)
        self.cases = find_brats_cases(self.root)
        if not self.cases:
            raise ValueError(f"{self.root}: no BraTS case folders (sub-folders with NAME_t1/t1ce/t2/flair files)")
        self.size = None if size is None else tuple(int(n) for n in size)
        self.class_names = list(TUMOUR_CLASSES)
        self._last_case: tuple[int, BratsCase] | None = None
        self._last_volume: tuple | None = None
        self.items: list[tuple[int, int]] = []
        self.labels: list[int] = []
        self.groups: list[int] = []
        for ci in range(len(self.cases)):
            case = self._case(ci)
            other = tuple(a for a in range(3) if a != axis)
            brain = (case.image != 0).any(axis=0).sum(axis=other)
            pixel_mm2 = float(np.prod([case.meta.zooms[a] for a in other]))
            tumour = (case.seg > 0).sum(axis=other) * pixel_mm2
            keep = brain >= min_brain_fraction * max(int(brain.max()), 1)
            for s in range(0, len(brain), int(stride)):
                if not keep[s] or 0 < tumour[s] < min_tumour_mm2:
                    continue
                self.items.append((ci, s))
                self.labels.append(int(tumour[s] > 0))
                self.groups.append(ci)
        self.names = [f"{self.cases[c].name}:{s}" for c, s in self.items]

    def _case(self, index: int) -> BratsCase:
        # items are ordered by case, so keeping the last case loaded makes sequential reads load each once
        if self._last_case is None or self._last_case[0] != index:
            self._last_case = (index, load_brats_case(self.cases[index], self.modalities, require_seg=True))
        return self._last_case[1]

    def _volume(self, index: int) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
        if self._last_volume is None or self._last_volume[0] != index:
            case = self._case(index)
            full = default_crop_size(_voxel_size(case))
            size = self.size or tuple(n for a, n in enumerate(full) if a != self.axis)
            if len(size) != 2:
                raise ValueError(f"slice size must be (H, W), got {size}")
            centre = tuple(c for a, c in enumerate(foreground_centre(case.image)) if a != self.axis)
            self._last_volume = (index, zscore_nonzero(case.image), centre, tuple(size))
        return self._last_volume[1:]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        ci, s = self.items[index % len(self)]
        volume, centre, size = self._volume(ci)
        plane = np.take(volume, s, axis=self.axis + 1)
        image = crop_or_pad(plane, size, centre=centre)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(self.labels[index % len(self)])


class ImageFolderDataset(Dataset):
    """A 2D image folder (one sub-folder per class, PNG/JPEG grey or RGB) as ``(image, label)`` items.

    Images are float32 (``channels``, H, W) in [0, 1], resized to ``size`` (an int
    or (H, W)); ``classes`` are the sub-folder names in sorted order.
    """

    scaling = "[0, 1]"

    def __init__(self, root: str | os.PathLike, size: int | Sequence[int] = 64, channels: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.root, self.channels = Path(root), channels
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(int(n) for n in size)
        pairs, self.classes = find_images(self.root)
        self.class_names = list(self.classes)
        self.paths = [p for p, _ in pairs]
        self.labels = [c for _, c in pairs]
        self.groups = list(range(len(pairs)))
        self.names = [str(p.relative_to(self.root)) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index], channels=self.channels, size=self.size)
        return torch.from_numpy(image), torch.tensor(self.labels[index], dtype=torch.int64)


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0, labels: Sequence[int] | None = None,
                  groups: Sequence | None = None) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``n`` items: ``(train indices, val indices)``, each sorted.

    Items with the same ``groups`` value (e.g. slices of one case) stay together;
    with ``labels`` the groups are drawn per class (a group's class is its most
    frequent label), so each class is held out in about ``val_fraction``. Every
    class with at least two groups keeps at least one on each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n or (labels is not None and len(labels) != n):
        raise ValueError(f"labels and groups must have one entry per item ({n})")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict = {}
    for g, idx in members.items():
        key = 0 if labels is None else max(set(labels[i] for i in idx), key=[labels[i] for i in idx].count)
        strata.setdefault(key, []).append(g)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for key in sorted(strata, key=str):
        gs = strata[key]
        order = [gs[i] for i in rng.permutation(len(gs))]
        k = int(math.floor(len(gs) * val_fraction + 0.5))
        if val_fraction > 0 and len(gs) > 1:
            k = min(max(k, 1), len(gs) - 1)
        for j, g in enumerate(order):
            (val if j < k else train).extend(members[g])
    return sorted(train), sorted(val)


def train_val_split(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0,
                    stratify: bool = True) -> tuple[Subset, Subset]:
    """Split a dataset of this module into train/validation :class:`~torch.utils.data.Subset` s.

    Uses the dataset's ``groups`` (cases stay whole) and, with ``stratify``, its ``labels``.
    """
    labels = getattr(dataset, "labels", None) if stratify else None
    groups = getattr(dataset, "groups", None)
    train, val = split_indices(len(dataset), val_fraction, seed, labels=labels, groups=groups)
    return Subset(dataset, train), Subset(dataset, val)
