"""Random patches and augmentations of in-memory samples, for training.

A fully convolutional network trained on patches segments whole volumes at
inference (the zoo's U-Net pads any size). Patches are drawn around a tumour
voxel with probability ``foreground_fraction`` (tumour is a small part of a brain,
so uniform patches would mostly show background) and anywhere otherwise.
The same class also augments whole samples (a classifier's): flips, small shifts
and intensity jitter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["RandomPatches"]


class RandomPatches(Dataset):
    """``per_case`` random patches of ``size`` from each ``(image (C, *S), target)`` item.

    ``target`` is a class label (kept as it is) or region channels (R, *S), cut and
    moved with the image. Draws come from one generator seeded by ``seed``, so reading
    the items in the same order (a seeded shuffle, no worker processes) gives the same
    patches. Augmentations, each drawn per item:

    * ``flip_axes``: spatial axes each flipped with probability 1/2 (e.g. ``(0,)``,
      left-right in RAS);
    * ``shift``: the patch moved by up to this many voxels per axis (zeros come in at
      the edges), on top of where it would be cut;
    * ``intensity``: every channel's non-zero (brain) voxels scaled by
      ``1 + U(-a, a)`` and offset by ``U(-a, a)`` (the samples are z-scored, so
      ``a`` is in standard deviations); the zero background stays zero.
    """

    def __init__(self, base: Dataset, size: Sequence[int], per_case: int = 1, foreground_fraction: float = 0.67,
                 seed: int = 0, flip_axes: Sequence[int] = (), shift: int = 0, intensity: float = 0.0):
        self.base = base
        self.size = tuple(int(s) for s in size)
        self.per_case = int(per_case)
        if self.per_case < 1 or not 0 <= foreground_fraction <= 1 or min(self.size) < 1:
            raise ValueError("per_case must be >= 1, foreground_fraction in [0, 1] and size positive, got "
                             f"{per_case!r}, {foreground_fraction!r}, {size!r}")
        self.foreground_fraction = float(foreground_fraction)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if int(shift) < 0 or not 0 <= float(intensity) < 1:
            raise ValueError(f"shift must be >= 0 voxels and intensity in [0, 1), got {shift!r}, {intensity!r}")
        self.shift = int(shift)
        self.intensity = float(intensity)
        self.rng = np.random.default_rng([int(seed), 7])
        self._foreground: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.base) * self.per_case

    def _fg(self, index: int, target: torch.Tensor) -> np.ndarray:
        if index not in self._foreground:
            self._foreground[index] = torch.nonzero(target.reshape(-1, *target.shape[-len(self.size):]).sum(0) > 0
                                                    ).numpy()
        return self._foreground[index]

    def __getitem__(self, i: int):
        index = i % len(self.base)
        image, target = self.base[index]
        spatial = tuple(image.shape[1:])
        if len(spatial) != len(self.size):
            raise ValueError(f"patch size {self.size} does not match the sample's spatial shape {spatial}")
        # class labels (no spatial target) are kept as they are; only the image is cut and flipped
        fg = self._fg(index, target) if target.ndim == image.ndim else ()
        if len(fg) and self.rng.random() < self.foreground_fraction:
            centre = fg[self.rng.integers(len(fg))]
            start = [int(c) - p // 2 + int(self.rng.integers(-(p // 4), p // 4 + 1)) for c, p in zip(centre, self.size)]
        else:
            start = [int(self.rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(spatial, self.size)]
        start = [min(max(s, 0), max(n - p, 0)) for s, n, p in zip(start, spatial, self.size)]
        if self.shift:
            start = [s + int(self.rng.integers(-self.shift, self.shift + 1)) for s in start]
        image = _window(image, start, self.size)
        target = _window(target, start, self.size) if target.ndim == image.ndim else target
        for axis in self.flip_axes:
            if self.rng.random() < 0.5:
                image = image.flip(axis + 1)
                if target.ndim == image.ndim:
                    target = target.flip(axis + 1)
        if self.intensity:
            a = self.intensity
            scale = torch.from_numpy(1 + self.rng.uniform(-a, a, image.shape[0])).to(image.dtype)
            offset = torch.from_numpy(self.rng.uniform(-a, a, image.shape[0])).to(image.dtype)
            view = (-1,) + (1,) * (image.ndim - 1)
            image = torch.where(image != 0, image * scale.view(view) + offset.view(view), image)
        return image.contiguous(), target.contiguous()


def _window(array: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``array[:, start:start + size]`` per spatial axis, zero-filled where the window leaves the array."""
    spatial = array.shape[1:]
    if all(0 <= s and s + p <= n for s, p, n in zip(start, size, spatial)):
        return array[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, size))]
    out = array.new_zeros((array.shape[0], *size))
    src, dst = [slice(None)], [slice(None)]
    for s, p, n in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out
