"""Building blocks of the synthetic brain: smooth random fields, deformation, bias, noise, tumour shape.

All functions take a ``numpy.random.Generator`` so that a seed fixes the result.
Sizes are given in millimetres and converted with the voxel size ``spacing``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "smooth_noise", "random_deformation", "deform", "bias_field", "rician_noise", "tumour_labels",
    "ball",
]


def smooth_noise(shape, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape`` rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _smooth_basis(n: int, points: int) -> np.ndarray:
    """(n, points) weights spreading ``points`` control values smoothly over ``n`` samples (rows sum to 1)."""
    t = np.linspace(0.0, points - 1.0, n)[:, None]
    w = np.exp(-0.5 * ((t - np.arange(points)[None, :]) / 0.7) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def separable_sum(coef: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
    """``sum_abc coef[a, b, c] * bases[0][x, a] * bases[1][y, b] * bases[2][z, c]`` as an (X, Y, Z) array.

    Contracted one axis at a time with plain multiply-adds (no BLAS), so the result
    does not depend on the number of threads: the phantom's bytes must not.
    """
    bx, by, bz = (np.asarray(b, np.float32) for b in bases)
    t = np.einsum("abc,zc->abz", coef.astype(np.float32), bz)  # small
    t = np.einsum("abz,yb->ayz", t, by)  # (A, Y, Z)
    out = np.zeros((bx.shape[0],) + t.shape[1:], np.float32)
    for a in range(bx.shape[1]):
        out += bx[:, a, None, None] * t[a][None]
    return out


def random_deformation(shape, spacing: float, rng: np.random.Generator, amplitude_mm: float = 3.0,
                       control_points: int = 5, max_scale: float = 0.06, max_rotation_deg: float = 5.0,
                       max_shift_mm: float = 3.0) -> np.ndarray:
    """Sampling coordinates (3, *shape) of a random smooth deformation of a 3D grid.

    A random affine part (per-axis scaling within ``1 +- max_scale``, rotation about
    each axis within ``max_rotation_deg``, shift within ``max_shift_mm``) about the
    grid centre plus a smooth displacement with standard deviation ``amplitude_mm``
    interpolated from a ``control_points``^3 random grid. Use with :func:`deform`.
    """
    shape = tuple(shape)
    centre = (np.array(shape, np.float64) - 1) / 2
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = rot @ r
    matrix = rot @ np.diag(1 + rng.uniform(-max_scale, max_scale, 3))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3) / spacing
    coarse = rng.standard_normal((3,) + (control_points,) * 3).astype(np.float32) * (amplitude_mm / spacing)
    idx = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)]
    coords = np.empty((3,) + shape, np.float32)
    for out_axis in range(3):
        # affine part, built by broadcasting one axis at a time (no dense meshgrid of products)
        acc = np.full(shape, centre[out_axis] + shift[out_axis], np.float32)
        for in_axis in range(3):
            view = [1, 1, 1]
            view[in_axis] = shape[in_axis]
            acc += np.float32(matrix[out_axis, in_axis]) * idx[in_axis].reshape(view)
        bases = [_smooth_basis(n, control_points) for n in shape]
        coords[out_axis] = acc + separable_sum(coarse[out_axis], bases)
    return coords


def deform(volumes: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear resampling of ``volumes`` ((K, X, Y, Z) or (X, Y, Z)) at ``coords``; outside is 0.

    ``coords`` (3, *out_shape) are voxel coordinates into the volumes, e.g. from
    :func:`random_deformation`. Runs with torch's ``grid_sample`` (all channels at once).
    """
    import torch
    import torch.nn.functional as F

    single = volumes.ndim == 3
    vols = torch.from_numpy(np.ascontiguousarray(volumes[None] if single else volumes, np.float32))
    sizes = torch.tensor(vols.shape[1:], dtype=torch.float32).reshape(3, 1, 1, 1)
    grid = torch.from_numpy(np.ascontiguousarray(coords, np.float32)) * (2.0 / (sizes - 1)) - 1.0
    grid = grid.flip(0).permute(1, 2, 3, 0)[None]  # grid_sample wants (x, y, z) = (last, middle, first) axis
    out = F.grid_sample(vols[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    out = out.numpy()
    return out[0] if single else out


def bias_field(shape, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """A smooth multiplicative intensity bias: exp of a random quadratic polynomial, about 1 +- ``strength``."""
    bases = []
    for n in shape:
        t = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        bases.append(np.stack([np.ones_like(t), t, 1.5 * t * t - 0.5], axis=1))
    coef = rng.normal(0.0, strength / 2, (3, 3, 3)).astype(np.float32)
    coef[0, 0, 0] = 0.0
    log_field = separable_sum(coef, bases)
    return np.exp(log_field).astype(np.float32)


def rician_noise(values: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``values`` plus complex Gaussian noise of standard deviation ``sigma`` (Rician)."""
    real = values + np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def ball(shape, centre, radius_vox: float) -> np.ndarray:
    """Boolean ball of ``radius_vox`` voxels around ``centre`` (voxel coordinates)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return dist2 <= radius_vox ** 2


def _irregular_distance(offsets: np.ndarray, radius_vox: float, axes: np.ndarray, rotation: np.ndarray,
                        noise: np.ndarray, roughness: float) -> np.ndarray:
    """Normalised distance (< 1 inside) from the centre of a rotated ellipsoid with a noisy border."""
    dist2 = np.zeros(offsets.shape[1:], np.float32)
    for i in range(3):  # explicit products rather than a BLAS call, for thread-independent results
        local = sum(np.float32(rotation[j, i]) * offsets[j] for j in range(3)) / np.float32(axes[i])
        dist2 += local * local
    dist = np.sqrt(dist2) / np.float32(radius_vox)
    # clipped so that the border stays within about 0.5-1.8 radii: one blob, no far islands
    return dist * (1.0 + roughness * np.clip(noise, -1.5, 1.5))


def _component_at(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` that touch ``seed`` (all of ``mask`` if none does)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    touching = np.unique(labels[seed & mask])
    touching = touching[touching > 0]
    if touching.size == 0:
        touching = [np.argmax(np.bincount(labels.ravel())[1:]) + 1]
    return np.isin(labels, touching)


def tumour_labels(shape, centre, spacing: float, rng: np.random.Generator, grade: str,
                  wt_radius_mm: float, allowed: np.ndarray) -> np.ndarray:
    """BraTS labels (uint8, 0/1/2/4) of one tumour centred at ``centre`` (voxels).

    Nested irregular blobs: the whole tumour (radius ``wt_radius_mm``) holds a core
    (0.45-0.8 of its radius); for ``grade="HGG"`` the core is an enhancing rim (label 4)
    around a necrotic centre (label 1), for ``"LGG"`` it is non-enhancing (label 1).
    The rest of the whole tumour is oedema (label 2). Labels are kept only where
    ``allowed`` (bool, e.g. brain without ventricles).
    """
    labels = np.zeros(shape, np.uint8)
    reach = int(np.ceil(1.9 * wt_radius_mm / spacing)) + 2
    lo = [max(0, int(round(c)) - reach) for c in centre]
    hi = [min(n, int(round(c)) + reach + 1) for c, n in zip(centre, shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_shape = tuple(b - a for a, b in zip(lo, hi))
    grids = np.meshgrid(*[np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)],
                        indexing="ij")
    offsets = np.stack(grids)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = q.astype(np.float32)

    def region(radius_mm: float, roughness: float, feature_mm: float) -> np.ndarray:
        axes = rng.uniform(0.75, 1.25, 3).astype(np.float32)
        noise = smooth_noise(sub_shape, max(feature_mm / spacing, 0.8), rng)
        return _irregular_distance(offsets, radius_mm / spacing, axes, rotation, noise, roughness) < 1.0

    allowed_box = allowed[box]
    whole = region(wt_radius_mm, rng.uniform(0.2, 0.35), rng.uniform(4.0, 8.0)) & allowed_box
    core_radius = wt_radius_mm * rng.uniform(0.45, 0.8)
    core = region(core_radius, rng.uniform(0.15, 0.3), rng.uniform(3.0, 6.0)) & allowed_box
    whole = _component_at(whole | core, core)
    core &= whole
    sub = np.where(whole | core, 2, 0).astype(np.uint8)
    if grade == "HGG":
        # the rim must stay at least ~1.5 voxels thick to survive at coarse resolutions
        necrosis_radius = min(core_radius * rng.uniform(0.5, 0.8), core_radius - 1.5 * spacing)
        necrosis = region(max(necrosis_radius, 0.5 * spacing), rng.uniform(0.1, 0.3), rng.uniform(2.0, 5.0))
        sub[core] = 4
        sub[core & necrosis] = 1
    elif grade == "LGG":
        sub[core] = 1
    else:
        raise ValueError(f"grade must be 'HGG' or 'LGG', got {grade!r}")
    labels[box] = sub
    return labels
