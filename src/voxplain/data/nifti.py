"""Read any NIfTI image in RAS orientation and write maps back aligned with the source scan.

Arrays handed to the rest of voxplain are float32 and in RAS+ voxel order (first
axis towards the subject's Right, second Anterior, third Superior), whatever the
orientation stored in the file. :class:`NiftiMeta` remembers the file's affine
and orientation, so :func:`save_nifti_like` writes a map computed on the RAS
array back on the source grid: it overlays the original scan in any viewer.

A 4D file's fourth axis is usually time (fMRI, DWI, perfusion), not modalities,
so :func:`load_nifti` refuses it unless asked to read that axis as channels
(``channels_from_4d=True``); it then comes back channels first, (C, X, Y, Z),
following the (C, *spatial) convention of voxplain. ITK-style vector images
(components on the fifth axis) are channels by definition and are read as such.
Written files keep the source's qform and sform codes (scanner, aligned, MNI...).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod

from ..atomic import atomic_file

__all__ = ["NiftiMeta", "load_nifti", "save_nifti_like", "write_nifti", "is_nifti_path", "check_same_grid",
           "GRID_TOLERANCE_MM"]

_RAS = ornt_mod.axcodes2ornt(("R", "A", "S"))

#: Two images are on one grid when their RAS shapes are equal and their RAS voxel-to-world
#: matrices differ by at most this much in every element (mm for the origin, mm per voxel for
#: the axes): far below any voxel, above the float rounding of headers written by different tools.
GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class NiftiMeta:
    """Where a loaded image came from and how to map RAS arrays back onto it.

    Attributes:
        path: the source file (None for an image made in memory).
        affine: the source file's voxel-to-world matrix (4x4).
        shape: the source file's spatial shape (as stored, not reoriented).
        ornt: the source's orientation (nibabel ``ornt`` array, one row per axis).
        header: a copy of the source NIfTI header.
    """

    path: Path | None
    affine: np.ndarray
    shape: tuple[int, int, int]
    ornt: np.ndarray
    header: nib.Nifti1Header

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation of the source voxel axes, e.g. ``('L', 'P', 'S')``."""
        return tuple(ornt_mod.ornt2axcodes(self.ornt))

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the arrays returned by :func:`load_nifti` (RAS order)."""
        return tuple(int(self.shape[int(axis)]) for axis in self._to_ras()[:, 0].argsort())

    @property
    def ras_affine(self) -> np.ndarray:
        """Voxel-to-world matrix of the RAS-ordered array."""
        return self.affine @ ornt_mod.inv_ornt_aff(self._to_ras(), self.shape)

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along the RAS axes."""
        return tuple(float(z) for z in np.sqrt((self.ras_affine[:3, :3] ** 2).sum(axis=0)))

    def _to_ras(self) -> np.ndarray:
        return ornt_mod.ornt_transform(self.ornt, _RAS)

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape) -> "NiftiMeta":
        """Metadata for an image made in memory on a grid given by ``affine`` and ``shape``."""
        affine = np.asarray(affine, dtype=float)
        header = nib.Nifti1Header()
        header.set_data_shape(tuple(shape))
        # the grid is known: maps written on it say so (scanner coordinates), rather than "unknown" (0)
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        return cls(None, affine, tuple(int(s) for s in shape), ornt_mod.io_orientation(affine), header)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether the name ends in ``.nii`` or ``.nii.gz``."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def check_same_grid(reference: tuple[str | os.PathLike, NiftiMeta, tuple[int, ...]],
                    other: tuple[str | os.PathLike, NiftiMeta, tuple[int, ...]]) -> None:
    """Refuse to stack ``other`` with ``reference`` unless both are on one voxel grid.

    Each is ``(path, meta, RAS spatial shape)`` as :func:`load_nifti` returns them. The
    grids must have the same shape and RAS voxel-to-world matrices equal within
    :data:`GRID_TOLERANCE_MM`; files stored in different orientations are fine when
    they describe the same grid (they are compared after reorientation to RAS).
    """
    (ref_path, ref_meta, ref_shape), (path, meta, shape) = reference, other
    ref_name, name = Path(ref_path).name, Path(path).name
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(f"{name} is not on the same grid as {ref_name}: shape mismatch, {tuple(shape)} vs "
                         f"{tuple(ref_shape)} (after reorientation to RAS); resample it onto {ref_name}'s grid first")
    diff = float(np.abs(meta.ras_affine - ref_meta.ras_affine).max())
    if diff > GRID_TOLERANCE_MM:
        raise ValueError(f"{name} is not on the same grid as {ref_name}: their voxel-to-world matrices (affines, "
                         f"compared in RAS order) differ by up to {diff:.4g} mm, more than the {GRID_TOLERANCE_MM} "
                         f"mm allowed, so the images would be stacked out of register; resample it onto "
                         f"{ref_name}'s grid first")


def load_nifti(path: str | os.PathLike, channels_from_4d: bool = False) -> tuple[np.ndarray, NiftiMeta]:
    """Read a 3D NIfTI file (``.nii`` or ``.nii.gz``, any data type and orientation), or a 4D one on request.

    Returns the data as float32 in RAS order, (X, Y, Z) for 3D and (C, X, Y, Z) for
    4D, with the file's scaling applied, and its :class:`NiftiMeta`. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file if
    it cannot be read, is not 3D/4D, or is 4D without ``channels_from_4d`` (its
    fourth axis, often time, would be read as input channels).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"not a NIfTI image but {type(img).__name__}")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError,
            TypeError, MemoryError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"cannot read NIfTI file {path}: {reason}") from None
    # ITK-style vector images store channels as a 5th axis after a singleton time axis
    vector = data.ndim == 5 and data.shape[3] == 1
    while data.ndim > 4 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3D or 4D image in {path}, got shape {data.shape}")
    if data.ndim == 4 and not vector and not channels_from_4d:
        raise ValueError(f"{path} is a 4D image of shape {data.shape}: its 4th axis ({data.shape[3]} volumes, "
                         "often time points) would be read as input channels. Give one 3D file per channel, "
                         "or pass --channels-from-4d (API: channels_from_4d=True) if the volumes are channels")
    if not np.isfinite(data).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3])
        raise ValueError(f"{path}: its affine (voxel-to-world matrix) is singular or not finite ({rows}), so "
                         "the voxel axes have no orientation or size; fix the header's sform/qform (or pixdim)")
    meta = NiftiMeta(path, affine, tuple(int(s) for s in data.shape[:3]), ornt_mod.io_orientation(affine),
                     img.header.copy())
    data = ornt_mod.apply_orientation(data, meta._to_ras())
    if data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    return np.ascontiguousarray(data, dtype=np.float32), meta


def _xform_codes(header) -> tuple[int, int]:
    """The (qform, sform) codes of a source header; scanner (1) without a header."""
    if header is None:
        return 1, 1
    return int(header["qform_code"]), int(header["sform_code"])


def write_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
                header: nib.Nifti1Header | None = None, dtype=None, compresslevel: int = 1) -> Path:
    """Write a NIfTI file atomically; same inputs give the same bytes.

    ``data`` is written as stored (voxel order of ``affine``; a 4D array has its
    channel axis last). The qform and sform codes are the ``header``'s (so a map
    of an aligned or MNI-space scan says so too), scanner (1) without a header. ``.nii.gz`` files are gzipped without a time stamp or file
    name in the gzip header, so a repeated run reproduces the file exactly.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"a NIfTI file name must end in .nii or .nii.gz, got {path.name}")
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    qform_code, sform_code = _xform_codes(header)
    img = nib.Nifti1Image(data, np.asarray(affine, float), header=header)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=qform_code)
    img.set_sform(img.affine, code=sform_code)
    if np.issubdtype(data.dtype, np.floating):
        img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
    with atomic_file(path) as tmp:
        tmp.write_bytes(raw)
    return path


def save_nifti_like(array, meta: NiftiMeta, path: str | os.PathLike, dtype=np.float32) -> Path:
    """Write an array computed on a :func:`load_nifti` result back in the source's grid and orientation.

    ``array`` is (X, Y, Z), (C, X, Y, Z) or (X, Y, Z, C) in RAS order with the
    spatial shape of the loaded array (a torch tensor is accepted); it is reoriented
    to the source's voxel order and written with the source affine, as float32 by
    default. Several channels make a 4D file (channels last, as NIfTI stores them).
    """
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a (X, Y, Z) or 4D array to save, got shape {array.shape}")
    if array.ndim == 4 and tuple(array.shape[1:]) == meta.ras_shape:
        array = np.moveaxis(array, 0, 3)  # channels first -> the NIfTI layout, channels last
    spatial = tuple(array.shape[:3])
    if spatial != meta.ras_shape:
        raise ValueError(f"array shape {tuple(array.shape)} does not match the source image "
                         f"{meta.path or ''}: expected spatial shape {meta.ras_shape} (RAS), as "
                         "(X, Y, Z), (C, X, Y, Z) or (X, Y, Z, C)")
    back = ornt_mod.ornt_transform(_RAS, meta.ornt)
    out = np.ascontiguousarray(ornt_mod.apply_orientation(array, back))
    header = meta.header.copy()
    header.set_data_shape(out.shape)
    return write_nifti(out, meta.affine, path, header=header, dtype=dtype)
