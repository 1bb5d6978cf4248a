"""Read DICOM series (one per MRI modality) into RAS arrays with the correct affine.

A folder holds one series per modality, in sub-folders or mixed in one folder;
files are grouped by ``SeriesInstanceUID``. Each series becomes a volume:

* slices sorted by their position along the slice normal: ``ImagePositionPatient``
  projected on ``row direction x column direction`` (the two halves of
  ``ImageOrientationPatient``), whatever the file names or ``InstanceNumber`` say;
* values with ``RescaleSlope``/``RescaleIntercept`` applied, as float32;
* voxel ``(i, j, k)`` = (column, row, slice), with the affine built from
  ``ImageOrientationPatient``, ``PixelSpacing`` (row spacing first, then column
  spacing) and the positions of the first and last slice; DICOM's patient
  coordinates are LPS, so the x and y rows are negated to get the RAS world of
  NIfTI and nibabel.

:func:`load_dicom_series` and :func:`load_dicom_modalities` return what
:func:`voxplain.data.nifti.load_nifti` returns: data in RAS voxel order and a
:class:`~voxplain.data.nifti.NiftiMeta` of the series' own grid, so
:func:`~voxplain.data.nifti.save_nifti_like` writes maps as NIfTI on that grid.

Refused with a clear error: images of one series with different orientations,
pixel spacings or sizes; a missing slice (a gap in the positions); two images at
one position (several echoes or time points in one series); positions that do
not lie on a line; several series where one was expected; enhanced
(multi-frame) DICOM. Series of several modalities must share one grid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as ornt_mod

from .brats import ALIASES, MODALITIES
from .nifti import NiftiMeta

__all__ = ["DicomSeries", "find_dicom_series", "load_dicom_series", "load_dicom_modalities",
           "modality_from_description", "is_dicom_folder"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-4
_SPACING_RTOL = 1e-3
_GAP_RTOL = 0.05  # a slice step may differ from the median step by this fraction


@dataclass
class DicomSeries:
    """The files of one DICOM series and what its headers say (pixels are read by :meth:`load`).

    Attributes:
        uid: ``SeriesInstanceUID``.
        description: ``SeriesDescription`` (or ``ProtocolName``; may be empty).
        folder: the folder holding its first file.
        files: its files, sorted by position along the slice normal.
        positions: (n, 3) ``ImagePositionPatient`` of the sorted files (LPS, mm).
        orientation: the six ``ImageOrientationPatient`` numbers.
        pixel_spacing: (row spacing, column spacing) in mm.
        shape: (rows, columns) of every image.
    """

    uid: str
    description: str
    folder: Path
    files: list[Path]
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    slice_thickness: float | None = None

    @property
    def modality(self) -> str | None:
        """t1/t1ce/t2/flair from the description, else from the folder's name, else None."""
        guess = modality_from_description(self.description)
        if guess is None and ALIASES.get(self.folder.name.lower()) in MODALITIES:
            guess = ALIASES[self.folder.name.lower()]
        return guess

    @property
    def affine(self) -> np.ndarray:
        """Voxel (column, row, slice) to RAS world (mm) matrix."""
        row_dir, col_dir = self.orientation[:3], self.orientation[3:]
        if len(self.files) > 1:
            step = (self.positions[-1] - self.positions[0]) / (len(self.files) - 1)
        else:
            step = np.cross(row_dir, col_dir) * (self.slice_thickness or 1.0)
        lps = np.eye(4)
        lps[:3, 0] = row_dir * self.pixel_spacing[1]  # along a row: column index, column spacing
        lps[:3, 1] = col_dir * self.pixel_spacing[0]
        lps[:3, 2] = step
        lps[:3, 3] = self.positions[0]
        return _LPS_TO_RAS @ lps

    def describe(self) -> str:
        """One line naming the series for error messages."""
        return (f"series {self.uid[-12:]} ({self.description or 'no description'!r}, {len(self.files)} images, "
                f"in {self.folder})")

    def load(self) -> tuple[np.ndarray, NiftiMeta]:
        """The volume in RAS voxel order (float32, rescaled) and the :class:`NiftiMeta` of the series' grid."""
        import pydicom

        slices = []
        for f in self.files:
            ds = pydicom.dcmread(f)
            try:
                pixels = ds.pixel_array
            except Exception as err:  # noqa: BLE001 - decoder errors of many kinds
                raise ValueError(f"cannot decode the pixels of {f} (transfer syntax "
                                 f"{getattr(ds.file_meta, 'TransferSyntaxUID', '?')}): {_one_line(err)}") from None
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            slices.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
        stored = np.ascontiguousarray(np.stack(slices, axis=-1).transpose(1, 0, 2))  # (columns, rows, slices)
        affine = self.affine
        meta = NiftiMeta.from_affine(affine, stored.shape)
        meta = NiftiMeta(self.folder, meta.affine, meta.shape, meta.ornt, meta.header)
        data = ornt_mod.apply_orientation(stored, meta._to_ras())
        return np.ascontiguousarray(data, dtype=np.float32), meta


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with at least one readable DICOM image in it or below."""
    path = Path(path)
    return path.is_dir() and any(_read_header(f) is not None for f in _files(path))


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """All DICOM image series under ``folder`` (any depth), each checked and sorted; non-DICOM files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    groups: dict[str, list[tuple[Path, object]]] = {}
    for f in _files(folder):
        ds = _read_header(f)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    if not groups:
        raise ValueError(f"no DICOM images found in {folder}")
    series = [_make_series(uid, items) for uid, items in groups.items()]
    return sorted(series, key=lambda s: (str(s.folder), s.description, s.uid))


def load_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, NiftiMeta]:
    """Read the one DICOM series under ``folder`` as (X, Y, Z) float32 in RAS order, and its :class:`NiftiMeta`."""
    series = find_dicom_series(folder)
    if len(series) != 1:
        listed = "; ".join(s.describe() for s in series)
        raise ValueError(f"expected one DICOM series in {folder}, found {len(series)}: {listed}")
    return series[0].load()


def load_dicom_modalities(folder: str | os.PathLike, modalities: Sequence[str] = MODALITIES
                          ) -> tuple[np.ndarray, NiftiMeta, tuple[str, ...]]:
    """Read one DICOM series per modality under ``folder`` into a (C, X, Y, Z) RAS array.

    Each series' modality comes from its ``SeriesDescription`` (e.g. "AX T1 POST GAD"
    is t1ce, "SAG FLAIR" flair), else from its folder's name (``t1ce/``). Every
    modality in ``modalities`` must be found exactly once, and all series must share
    one grid (same shape and affine), as co-registered BraTS scans do.

    Returns the array in ``modalities`` order, the :class:`NiftiMeta` of the grid,
    and the modality names.
    """
    series = find_dicom_series(folder)
    wanted = tuple(m.lower() for m in modalities)
    found: dict[str, list[DicomSeries]] = {}
    for s in series:
        found.setdefault(s.modality or "?", []).append(s)
    problems = [f"{m}: {'none found' if not found.get(m) else 'several: ' + '; '.join(s.describe() for s in found[m])}"
                for m in wanted if len(found.get(m, [])) != 1]
    if problems:
        listed = "; ".join(f"{s.describe()} -> {s.modality or 'unknown'}" for s in series)
        raise ValueError(f"cannot find one DICOM series per modality {wanted} in {folder} ({'; '.join(problems)}). "
                         f"Series found: {listed}. Name the sub-folders after the modalities (t1, t1ce, t2, flair) "
                         "or give each series a description that names its modality")
    chosen = [found[m][0] for m in wanted]
    volumes, meta = [], None
    for s in chosen:
        data, m = s.load()
        if meta is None:
            meta = m
        elif m.shape != meta.shape or not np.allclose(m.affine, meta.affine, atol=1e-3):
            raise ValueError(f"the DICOM series are not on one grid: {s.describe()} has shape {m.shape} and "
                             f"affine {np.round(m.affine, 3).tolist()}, {chosen[0].describe()} has shape "
                             f"{meta.shape} and affine {np.round(meta.affine, 3).tolist()}; register them first")
        volumes.append(data)
    return np.stack(volumes), meta, wanted


def modality_from_description(text: str) -> str | None:
    """t1, t1ce, t2 or flair from a free-text series description (e.g. "AX T1 POST GAD"), else None."""
    words = [w for w in re.split(r"[^a-z0-9+]+", str(text).lower()) if w]
    if any("flair" in w or w == "t2f" for w in words):
        return "flair"
    t1 = any(w.startswith("t1") or w in _T1_WORDS for w in words)
    t2 = any(w.startswith("t2") for w in words)
    if t1 == t2:  # neither, or both (ambiguous)
        return None
    if t2:
        return "t2"
    contrast = any(w in _CONTRAST_WORDS or w.startswith("gado")
                   or (w.startswith("t1") and w[2:].lstrip("w_+") in _CONTRAST_WORDS) for w in words)
    return "t1ce" if contrast else "t1"


_T1_WORDS = {"mprage", "spgr", "bravo", "tfl", "vibe"}
_CONTRAST_WORDS = {"ce", "c", "gd", "gad", "post", "contrast", "postcontrast", "+c", "+gd", "km", "kontrast"}


# -- internals ---------------------------------------------------------------
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_header(path: Path):
    """The header of a DICOM image file, or None for anything else (other files, DICOMDIR, non-images)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        return None
    return ds


def _make_series(uid: str, items: list[tuple[Path, object]]) -> DicomSeries:
    first_file, first = items[0]
    description = str(getattr(first, "SeriesDescription", "") or getattr(first, "ProtocolName", "") or "")
    name = f"series {uid[-12:]} ({description or 'no description'!r}, in {first_file.parent})"
    for f, ds in items:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ValueError(f"{f} is an enhanced (multi-frame) DICOM image with {frames} frames; convert it to "
                             "NIfTI (e.g. with dcm2niix) first")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise ValueError(f"{f} in {name} has no {tag}; cannot place it in space")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in items])
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        raise ValueError(f"{name} mixes images of different orientations (ImageOrientationPatient); expected one "
                         "orientation per series")
    if np.abs(spacings - spacings[0]).max() > _SPACING_RTOL * spacings[0].max():
        raise ValueError(f"{name} mixes pixel spacings {sorted({tuple(s) for s in spacings.tolist()})}; expected one")
    if len(shapes) != 1:
        raise ValueError(f"{name} mixes image sizes {sorted(shapes)}; expected one")
    orientation = orientations[0]
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    files = [items[i][0] for i in order]
    if len(files) > 1:
        _check_positions(positions, normal, name)
    thickness = getattr(first, "SliceThickness", None)
    return DicomSeries(uid, description, first_file.parent, files, positions, orientation,
                       (float(spacings[0][0]), float(spacings[0][1])), shapes.pop(),
                       float(thickness) if thickness not in (None, "") else None)


def _check_positions(positions: np.ndarray, normal: np.ndarray, name: str) -> None:
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise ValueError(f"{name} has two images at one position ({along[k]:.3f} mm along the slice normal): "
                         "several echoes, time points or acquisitions in one series are not supported")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > _GAP_RTOL * median):
        k = int(np.argmax(np.abs(steps - median)))
        raise ValueError(f"{name} has irregular slice positions: a step of {steps[k]:.3f} mm between "
                         f"{along[k]:.3f} and {along[k + 1]:.3f} mm where the others are {median:.3f} mm "
                         "(missing slice?)")
    line = positions[0] + np.outer(np.arange(len(positions)), (positions[-1] - positions[0]) / (len(positions) - 1))
    if np.abs(positions - line).max() > max(0.05 * median, 0.01):
        raise ValueError(f"{name} has slice positions that do not lie on a straight line")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
