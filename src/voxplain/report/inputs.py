"""Read what ``voxplain explain`` / ``inspect`` are pointed at into :class:`Case` objects.

Accepted: a BraTS case folder, a folder of case folders, one or more NIfTI files
(one channel each, or one 4D file when its volumes are channels), a folder of DICOM
series (one series per modality, or a single series), a 2D image (PNG, JPEG, TIFF,
BMP; 16-bit kept). Volumes come back in RAS voxel order with the
:class:`~voxplain.data.nifti.NiftiMeta` of their source grid, so maps can be written
back on the scan's grid (as NIfTI, also for DICOM input).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import IMAGE_SUFFIXES

__all__ = ["Case", "load_cases", "IMAGE_SUFFIXES"]


@dataclass
class Case:
    """One input to explain: ``image`` (C, *spatial) float32 as read (not normalised)."""

    name: str
    image: np.ndarray
    channels: list[str]
    meta: Any = None  # NiftiMeta for volumes, None for 2D images
    seg: np.ndarray | None = None
    #: what a cohort table says of the case (a phantom's subjects.csv row, BraTS 2020's name_mapping.csv)
    facts: dict[str, str] = field(default_factory=dict)

    def label_among(self, class_names: Sequence[str] | None) -> str | None:
        """The case's known class among ``class_names`` (e.g. its grade ``"HGG"``), or None."""
        if not class_names:
            return None
        for key in ("label", "class", "grade", *self.facts):
            value = str(self.facts.get(key, "")).strip()
            if value and value in class_names:
                return value
        return None

    @property
    def is_volume(self) -> bool:
        """True for 3D inputs."""
        return self.image.ndim == 4

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm (1 per axis for images)."""
        if self.meta is not None:
            return tuple(self.meta.zooms)
        return (1.0,) * (self.image.ndim - 1)


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load_image(path: Path, channels: int | None) -> Case:
    from ..data.images import load_image

    image = load_image(path, channels)
    names = ["grey"] if image.shape[0] == 1 else ["red", "green", "blue"]
    return Case(path.stem, image, names)


def _load_nifti_files(paths: Sequence[Path], channels_from_4d: bool = False) -> Case:
    from ..data.nifti import check_same_grid, load_nifti

    arrays, names, meta = [], [], None
    for p in paths:
        data, m = load_nifti(p, channels_from_4d=channels_from_4d)
        if data.ndim == 3:
            data = data[None]
        if meta is None:
            meta = m
        else:
            check_same_grid((paths[0], meta, arrays[0].shape[1:]), (p, m, data.shape[1:]))
        arrays.append(data)
        stem = _strip_nifti(p.name)
        names += [stem] if data.shape[0] == 1 else [f"{stem}[{i}]" for i in range(data.shape[0])]
    name = _strip_nifti(paths[0].name) if len(paths) == 1 else os.path.commonprefix(
        [_strip_nifti(p.name) for p in paths]).rstrip("_-") or "case"
    return Case(name, np.concatenate(arrays), names, meta)


def _load_brats(folder: Path) -> Case:
    from ..data.brats import load_brats_case

    from ..data.brats import read_subjects_table

    case = load_brats_case(folder)
    try:
        facts = read_subjects_table(folder.parent).get(case.name, {})
    except (OSError, ValueError, KeyError):
        facts = {}  # an unreadable cohort table only costs the comparison with the case's label
    return Case(case.name, case.image, list(case.modalities), case.meta, case.seg,
                {str(k): str(v) for k, v in facts.items()})


def _load_dicom(folder: Path) -> Case:
    """One DICOM series (one channel), or one series per modality (t1, t1ce, t2, flair) on one grid."""
    from ..data.dicom import find_dicom_series, load_dicom_modalities

    series = find_dicom_series(folder)
    if len(series) == 1:
        image, meta = series[0].load()
        return Case(folder.name, image[None], [series[0].modality or series[0].description or "dicom"], meta)
    image, meta, names = load_dicom_modalities(folder)
    return Case(folder.name, image, list(names), meta)


def _is_case_folder(folder: Path) -> bool:
    from ..data.brats import case_files

    files = case_files(folder)
    return any(m in files for m in ("t1", "t1ce", "t2", "flair"))


def load_cases(inputs: Sequence[str | os.PathLike], channels: int | None = None,
               channels_from_4d: bool = False) -> list[Case]:
    """Load the inputs of a command into cases (several for a folder of case folders).

    Args:
        inputs: one folder or image, or one or more NIfTI files (stacked as channels).
        channels: for 2D images, 1 (grey) or 3 (RGB); default as stored.
        channels_from_4d: read a 4D NIfTI file's volumes as channels (refused otherwise).
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input given")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
    if len(paths) > 1:
        if not all(p.is_file() and _strip_nifti(p.name) != p.name for p in paths):
            raise ValueError("several inputs must all be NIfTI files (one channel each); "
                             f"got {', '.join(str(p) for p in paths)}")
        return [_load_nifti_files(paths, channels_from_4d)]
    path = paths[0]
    if path.is_dir():
        if _is_case_folder(path):
            return [_load_brats(path)]
        from ..data.brats import find_brats_cases

        folders = find_brats_cases(path)
        if folders:
            return [_load_brats(f) for f in folders]
        from ..data.dicom import is_dicom_folder

        if is_dicom_folder(path):
            return [_load_dicom(path)]
        raise ValueError(f"{path} is neither a BraTS case folder (NAME_t1/t1ce/t2/flair.nii.gz), a folder of "
                         "case folders, nor a folder of DICOM series")
    if _strip_nifti(path.name) != path.name:
        return [_load_nifti_files([path], channels_from_4d)]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [_load_image(path, channels)]
    raise ValueError(f"cannot tell what {path} is: expected a BraTS case folder, a folder of cases, "
                     f"NIfTI file(s) (.nii, .nii.gz) or an image ({', '.join(IMAGE_SUFFIXES)})")
