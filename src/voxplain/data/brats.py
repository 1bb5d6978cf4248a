"""BraTS case folders: four modalities and an optional segmentation, any BraTS naming.

A case folder holds one NIfTI file per modality whose name ends in the modality's
suffix after ``_`` or ``-``:

* BraTS 2020/2021: ``NAME_t1``, ``NAME_t1ce``, ``NAME_t2``, ``NAME_flair``, ``NAME_seg``;
* BraTS 2023: ``NAME-t1n``, ``NAME-t1c``, ``NAME-t2w``, ``NAME-t2f``, ``NAME-seg``.

Images are returned in the 2021 order (t1, t1ce, t2, flair) and RAS orientation.
The 2023 segmentations label enhancing tumour 3; it is renamed 4, the label of
the earlier challenges that the rest of voxplain uses.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .nifti import NiftiMeta, check_same_grid, is_nifti_path, load_nifti

__all__ = ["BratsCase", "load_brats_case", "find_brats_cases", "case_files", "read_subjects_table",
           "MODALITIES", "ALIASES"]

#: modality order of :class:`BratsCase` images
MODALITIES = ("t1", "t1ce", "t2", "flair")

#: file suffix -> modality (2023 names and common variants)
ALIASES = {"t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t2": "t2", "t2w": "t2",
           "flair": "flair", "t2f": "flair", "seg": "seg"}

_SUFFIX = re.compile(r"[_-]([a-z0-9]+)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class BratsCase:
    """One loaded case: ``image`` float32 (4, X, Y, Z) in ``modalities`` order (RAS),
    ``seg`` int16 (X, Y, Z) with labels 0/1/2/4 or None, ``meta`` of the first
    modality (to save maps aligned with the scans), ``files`` modality -> path."""

    name: str
    image: np.ndarray
    seg: np.ndarray | None
    meta: NiftiMeta
    modalities: tuple[str, ...] = MODALITIES
    files: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(self.image.shape[1:])


def case_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Modality (and ``"seg"``) -> file in a case folder; raises if a name is ambiguous."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BraTS case folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not is_nifti_path(path) or path.name.startswith("."):
            continue
        match = _SUFFIX.search(path.name)
        key = ALIASES.get(match.group(1).lower()) if match else None
        if key is None:
            continue
        if key in found:
            raise ValueError(f"case {folder}: two files for {key}: {found[key].name} and {path.name}")
        found[key] = path
    return found


def load_brats_case(folder: str | os.PathLike, modalities=MODALITIES, require_seg: bool = False) -> BratsCase:
    """Load a BraTS case folder (2020/2021 or 2023 names) into a :class:`BratsCase`.

    A missing modality, modalities (or a segmentation) on different grids (see
    :func:`~voxplain.data.nifti.check_same_grid`), or an unreadable file raise an
    error that names the file (or the missing name). The segmentation is optional
    unless ``require_seg``.
    """
    folder = Path(folder)
    files = case_files(folder)
    wanted = tuple(ALIASES.get(m.lower(), m.lower()) for m in modalities)
    missing = [m for m in wanted if m not in files]
    if require_seg and "seg" not in files:
        missing.append("seg")
    if missing:
        present = ", ".join(sorted(p.name for p in files.values())) or "no NIfTI files"
        raise FileNotFoundError(f"case {folder}: missing {', '.join(missing)} "
                                f"(expected files named like {folder.name}_{missing[0]}.nii.gz; found {present})")
    arrays, meta, first = [], None, None
    for m in wanted:
        data, m_meta = load_nifti(files[m])
        if data.ndim != 3:
            raise ValueError(f"{files[m]}: expected a 3D image, got shape {data.shape}")
        if meta is None:
            meta, first = m_meta, files[m]
        else:
            check_same_grid((first, meta, arrays[0].shape), (files[m], m_meta, data.shape))
        arrays.append(data)
    seg = None
    if "seg" in files:
        labels, seg_meta = load_nifti(files["seg"])
        check_same_grid((first, meta, arrays[0].shape), (files["seg"], seg_meta, labels.shape))
        seg = np.rint(labels).astype(np.int16)
        values = set(np.unique(seg).tolist())
        if 3 in values and 4 not in values:  # BraTS 2023 numbering
            seg[seg == 3] = 4
            values = (values - {3}) | {4}
        bad = sorted(values - {0, 1, 2, 4})
        if bad:
            raise ValueError(f"{files['seg']}: unexpected label values {bad}; BraTS labels are 0, 1, 2, 4 (or 3 in 2023)")
    return BratsCase(name=folder.name, image=np.stack(arrays), seg=seg, meta=meta, modalities=wanted,
                     files={k: files[k] for k in (*wanted, "seg") if k in files})


def find_brats_cases(root: str | os.PathLike) -> list[Path]:
    """Case folders under ``root`` (sorted): its sub-folders that hold a flair or t1 file.

    ``root`` itself is returned if it is a case folder. Raises ``FileNotFoundError``
    if ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")

    def is_case(folder: Path) -> bool:
        try:
            files = case_files(folder)
        except (ValueError, OSError):
            return True  # let load_brats_case report what is wrong with it
        return "flair" in files or "t1" in files

    if is_case(root) and any(is_nifti_path(p) for p in root.iterdir()):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_case(p))


def read_subjects_table(root: str | os.PathLike) -> dict[str, dict]:
    """Per-case rows of ``subjects.csv`` (phantoms) or BraTS 2020's ``name_mapping.csv``, by case name.

    Each row gets a ``grade`` key ("HGG", "LGG" or "none") when the table has one.
    Returns an empty dict when neither table exists.
    """
    root = Path(root)
    table = {}
    phantom = root / "subjects.csv"
    mapping = root / "name_mapping.csv"
    if phantom.is_file():
        with open(phantom, newline="") as f:
            for row in csv.DictReader(f):
                table[row["name"]] = row
    elif mapping.is_file():
        with open(mapping, newline="") as f:
            for row in csv.DictReader(f):
                name = row.get("BraTS_2020_subject_ID") or next(iter(row.values()))
                row = dict(row)
                if "Grade" in row:
                    row["grade"] = row["Grade"].strip().upper()
                table[name] = row
    return table
