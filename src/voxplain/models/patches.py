"""Random patches of whole-volume samples, for faster segmentation training.

A fully convolutional network trained on patches segments whole volumes at
inference (the zoo's U-Net pads any size). Patches are drawn around a tumour
voxel with probability ``foreground_fraction`` (tumour is a small part of a brain,
so uniform patches would mostly show background) and anywhere otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["RandomPatches"]


class RandomPatches(Dataset):
    """``per_case`` random patches of ``size`` from each ``(image (C, *S), target (R, *S))`` item.

    Draws come from one generator seeded by ``seed``, so reading the items in the
    same order (a seeded shuffle, no worker processes) gives the same patches.
    ``flip_axes``: spatial axes each flipped with probability 1/2 (e.g. ``(0,)``,
    left-right in RAS).
    """

    def __init__(self, base: Dataset, size: Sequence[int], per_case: int = 1, foreground_fraction: float = 0.67,
                 seed: int = 0, flip_axes: Sequence[int] = ()):
        self.base = base
        self.size = tuple(int(s) for s in size)
        self.per_case = int(per_case)
        if self.per_case < 1 or not 0 <= foreground_fraction <= 1 or min(self.size) < 1:
            raise ValueError("per_case must be >= 1, foreground_fraction in [0, 1] and size positive, got "
                             f"{per_case!r}, {foreground_fraction!r}, {size!r}")
        self.foreground_fraction = float(foreground_fraction)
        self.flip_axes = tuple(int(a) for a in flip_axes)
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
        window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.size))
        image, target = image[window], target[window] if target.ndim == image.ndim else target
        for axis in self.flip_axes:
            if self.rng.random() < 0.5:
                image = image.flip(axis + 1)
                if target.ndim == image.ndim:
                    target = target.flip(axis + 1)
        return image.contiguous(), target.contiguous()
