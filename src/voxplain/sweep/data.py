"""The sweep's images, prepared once and shared by every worker as one tensor file.

Each trial trains on the same train/validation split, so the data is read,
resized and split once per sweep folder (``sweep-data.pt``) and every worker
process loads that file instead of decoding images again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ..atomic import atomic_file

__all__ = ["SweepData", "DATA_FILE"]

DATA_FILE = "sweep-data.pt"


@dataclass
class SweepData:
    """Train and validation images (N, C, S, S) with class indices, and their names."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    class_names: list[str]
    channel_names: list[str]
    source: str

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def majority_baseline(self) -> float:
        """Validation accuracy of a constant predictor: the share of the training set's most frequent class."""
        majority = int(torch.bincount(self.train_y, minlength=len(self.class_names)).argmax())
        return float((self.val_y == majority).float().mean()) if len(self.val_y) else 0.0

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.train_x, self.train_y)

    def val_dataset(self) -> TensorDataset:
        return TensorDataset(self.val_x, self.val_y)

    def save(self, path: str | Path) -> Path:
        with atomic_file(path) as tmp:
            torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "SweepData":
        return cls(**torch.load(path, weights_only=True))

    @classmethod
    def from_training_data(cls, data, image_size: int, source: str,
                           max_images: int | None = None, seed: int = 0) -> "SweepData":
        """Stack a :class:`~voxplain.models.training_data.TrainingData` split, resized to ``image_size``.

        ``max_images`` keeps a seeded random subset of each side of the split.
        """
        if data.val is None or len(data.val) == 0:
            raise ValueError(f"{source}: too few images to hold out a validation set")
        g = torch.Generator().manual_seed(seed)

        def stack(items):
            order = torch.randperm(len(items), generator=g).tolist()
            if max_images is not None:
                order = order[:max(1, round(max_images * len(items) / total))]
            x = torch.stack([torch.as_tensor(items[i][0], dtype=torch.float32) for i in sorted(order)])
            y = torch.stack([torch.as_tensor(items[i][1]).long().reshape(()) for i in sorted(order)])
            if tuple(x.shape[-2:]) != (image_size, image_size):
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                  antialias=True)
            return x, y

        total = len(data.train) + len(data.val)
        train_x, train_y = stack(data.train)
        val_x, val_y = stack(data.val)
        return cls(train_x, train_y, val_x, val_y, list(data.class_names), list(data.channel_names), source)
