"""Resample a scan to the voxel spacing and orientation a model was trained with, and maps back.

A model trained at 3 mm in RAS orientation must see a 1 mm LPS scan at 3 mm in
RAS; its explanation maps must then be written on the *source* grid, with the
source affine, so they overlay the original scan. :func:`resample_to_spacing`
does the first step and returns a :class:`GridMapping` that does the second.

Geometry. The scan is first reoriented to ``orientation`` (axis permutations and
flips: exact, no interpolation). Then, along every axis whose voxel size differs
from the requested one, the grid of ``n`` voxels of size ``z`` becomes one of
``n' = round(n z / z')`` voxels of size ``z'`` covering the same field of view
*centred on the same point* (the centre of the source grid), so that voxel ``j``
of the new grid sits at source voxel coordinate ``(n - 1) / 2 + (j - (n' - 1) / 2) z' / z``.
The new affine is the reoriented one with its columns scaled: an oblique scan
keeps its obliquity (no rotation is resampled). An axis whose spacing already
matches (relative difference below 1e-4) is left untouched, so a scan at the
model's spacing comes back unchanged, bit for bit.

Interpolation (scipy.ndimage, edges extended by the nearest voxel):

* images and explanation maps: **linear** (``kind="map"``). Linear interpolation
  reproduces any function linear in world coordinates exactly, and it neither
  overshoots nor creates negative values from non-negative maps.
* label maps (segmentations, masks, region labels): **nearest neighbour**
  (``kind="label"``): no value that is not a label appears.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt_mod
from scipy import ndimage

__all__ = ["GridMapping", "resample_to_spacing", "grid_from_config"]

_RELATIVE_TOLERANCE = 1e-4
_ORDERS = {"map": 1, "label": 0}


@dataclass(frozen=True)
class GridMapping:
    """How a source grid became a resampled one, and the way back.

    Attributes:
        source_shape: spatial shape of the source array.
        source_affine: voxel-to-world matrix of the source array (4x4).
        target_shape: spatial shape of the resampled array.
        target_affine: voxel-to-world matrix of the resampled array.
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    target_shape: tuple[int, int, int]
    target_affine: np.ndarray
    _source_ornt: np.ndarray  # nibabel ornt of the source's voxel axes
    _target_ornt: np.ndarray  # nibabel ornt of the resampled grid's voxel axes
    _scale: tuple[float, ...]  # per reoriented axis: target voxel size / source voxel size
    _offset: tuple[float, ...]  # reoriented source coordinate of target voxel 0

    @property
    def reoriented_shape(self) -> tuple[int, ...]:
        """Spatial shape of the source after reorientation, before the change of spacing."""
        return tuple(int(self.source_shape[int(a)]) for a in np.argsort(self._reorient[:, 0]))

    @property
    def _reorient(self) -> np.ndarray:
        return ornt_mod.ornt_transform(self._source_ornt, self._target_ornt)

    @property
    def is_identity(self) -> bool:
        """True when the resampled grid is the source grid (same voxels, same order)."""
        return self.source_shape == self.target_shape and np.allclose(self.source_affine, self.target_affine)

    def to_source(self, array, kind: str = "map") -> np.ndarray:
        """An array on the resampled grid, (*lead, *target_shape), put on the source grid (*lead, *source_shape).

        ``kind="map"`` interpolates linearly (images, explanation maps);
        ``kind="label"`` takes the nearest voxel (label maps, masks). Returns numpy,
        in the input's dtype.
        """
        array = _as_numpy(array)
        _check_spatial(array, self.target_shape, "resampled")
        out = _rescale(array, [1 / s for s in self._scale],
                       [-o / s for o, s in zip(self._offset, self._scale)], self.reoriented_shape, _order(kind))
        return _apply_ornt(out, ornt_mod.ornt_transform(self._target_ornt, self._source_ornt))

    def to_target(self, array, kind: str = "map") -> np.ndarray:
        """An array on the source grid, (*lead, *source_shape), resampled onto the target grid.

        The same resampling :func:`resample_to_spacing` applied (e.g. a ground-truth
        mask of the scan, with ``kind="label"``).
        """
        array = _as_numpy(array)
        _check_spatial(array, self.source_shape, "source")
        out = _apply_ornt(array, self._reorient)
        return _rescale(out, self._scale, self._offset, self.target_shape, _order(kind))


def resample_to_spacing(image, affine, spacing: float | Sequence[float] | None = None,
                        orientation: str | Sequence[str] | None = "RAS",
                        kind: str = "map") -> tuple[np.ndarray, np.ndarray, GridMapping]:
    """Reorient ``image`` to ``orientation`` and resample it to voxels of ``spacing`` mm.

    Args:
        image: (X, Y, Z) or (C, X, Y, Z) numpy array or torch tensor on the grid of ``affine``.
        affine: its 4x4 voxel-to-world matrix (e.g. ``NiftiMeta.ras_affine``).
        spacing: voxel size in mm (one number or one per axis of the *reoriented*
            grid); None keeps the source's.
        orientation: axis codes of the result, e.g. ``"RAS"`` (the closest
            axis-aligned orientation, as nibabel defines it); None keeps the source's.
        kind: ``"map"`` (linear) or ``"label"`` (nearest) interpolation.

    Returns:
        ``(array, affine, mapping)``: the resampled array (numpy, input dtype),
        its affine, and the :class:`GridMapping` whose ``to_source`` puts arrays on
        the resampled grid back on the source grid.
    """
    array = _as_numpy(image)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected an image (X, Y, Z) or (C, X, Y, Z), got shape {array.shape}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"expected an invertible 4x4 affine, got {affine.tolist()}")
    source_shape = tuple(int(n) for n in array.shape[-3:])
    source_ornt = ornt_mod.io_orientation(affine)
    target_ornt = source_ornt if orientation is None else _axcodes_ornt(orientation)
    reorient = ornt_mod.ornt_transform(source_ornt, target_ornt)
    reoriented = _apply_ornt(array, reorient)
    shape_r = tuple(int(n) for n in reoriented.shape[-3:])
    affine_r = affine @ ornt_mod.inv_ornt_aff(reorient, source_shape)
    zooms = np.sqrt((affine_r[:3, :3] ** 2).sum(axis=0))
    wanted = zooms if spacing is None else _spacing(spacing)
    scale, offset, target_shape = [], [], []
    for n, z, w in zip(shape_r, zooms, wanted):
        r, o, m = _axis_grid(n, z, w)
        scale.append(r)
        offset.append(o)
        target_shape.append(m)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = offset
    target_affine = affine_r @ step
    mapping = GridMapping(source_shape, affine, tuple(target_shape), target_affine, source_ornt, target_ornt,
                          tuple(scale),
                          tuple(offset))
    out = _rescale(reoriented, mapping._scale, mapping._offset, mapping.target_shape, _order(kind))
    return out, target_affine, mapping


def grid_from_config(config: Mapping) -> tuple[tuple[float, float, float] | None, str | None]:
    """The voxel spacing (mm) and orientation a checkpoint's ``config.json`` records, each None if absent.

    Reads ``spacing`` (one number or three) or ``preprocessing.resolution_mm``, and
    ``orientation`` or ``preprocessing.orientation``.
    """
    pre = config.get("preprocessing") or {}
    spacing = config.get("spacing", pre.get("spacing", pre.get("resolution_mm")))
    orientation = config.get("orientation", pre.get("orientation"))
    return (None if spacing is None else _spacing(spacing)), (None if orientation is None else str(orientation))


def _axcodes_ornt(orientation) -> np.ndarray:
    codes = tuple(str(orientation).upper()) if isinstance(orientation, str) else tuple(orientation)
    try:
        if len(codes) != 3:
            raise ValueError("three codes needed")
        return ornt_mod.axcodes2ornt(codes)
    except ValueError as err:
        raise ValueError(f"orientation must be three axis codes like 'RAS' or 'LPS', got {orientation!r} "
                         f"({err})") from None


def _axis_grid(n: int, size: float, wanted: float) -> tuple[float, float, int]:
    """(scale, offset, voxels) of the new grid along one axis: same centre, voxels of ``wanted`` mm."""
    if abs(wanted - size) <= _RELATIVE_TOLERANCE * size:
        return 1.0, 0.0, n
    m = max(1, int(round(n * size / wanted)))
    r = float(wanted / size)
    return r, (n - 1) / 2 - (m - 1) / 2 * r, m


def _spacing(spacing) -> tuple[float, float, float]:
    values = (spacing,) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive voxel size in mm, one number or three, got {spacing!r}")
    return values


def _order(kind: str) -> int:
    if kind not in _ORDERS:
        raise ValueError(f"kind must be 'map' (linear interpolation) or 'label' (nearest neighbour), got {kind!r}")
    return _ORDERS[kind]


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_spatial(array: np.ndarray, shape: tuple[int, ...], which: str) -> None:
    if array.ndim < 3 or tuple(array.shape[-3:]) != tuple(shape):
        raise ValueError(f"expected an array on the {which} grid, spatial shape {tuple(shape)} (last three axes), "
                         f"got shape {array.shape}")


def _apply_ornt(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Permute/flip the last three axes of ``array`` by a nibabel ornt transform (exact)."""
    lead = array.ndim - 3
    moved = np.moveaxis(array, range(lead), range(3, 3 + lead)) if lead else array
    out = ornt_mod.apply_orientation(moved, transform)
    return np.ascontiguousarray(np.moveaxis(out, range(3, 3 + lead), range(lead)) if lead else out)


def _rescale(array: np.ndarray, scale, offset, shape, order: int) -> np.ndarray:
    """Sample ``array`` (*lead, *spatial) at coordinates ``scale * j + offset`` for j over ``shape``."""
    if all(s == 1.0 for s in scale) and all(o == 0.0 for o in offset) and tuple(array.shape[-3:]) == tuple(shape):
        return array.copy()
    lead = array.shape[:-3]
    flat = array.reshape((-1,) + array.shape[-3:])
    dtype = flat.dtype if np.issubdtype(flat.dtype, np.floating) or order == 0 else np.float32
    out = np.empty((flat.shape[0],) + tuple(shape), dtype=dtype)
    for i, volume in enumerate(flat):
        ndimage.affine_transform(volume, np.asarray(scale, float), offset=np.asarray(offset, float),
                                 output_shape=tuple(shape), output=out[i], order=order, mode="nearest")
    return out.reshape(lead + tuple(shape))
