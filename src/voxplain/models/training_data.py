"""Turn a data folder into in-memory train / validation sets for ``train``.

The folder kinds are those of ``voxplain.data``: a BraTS / phantom cohort
(grade classification, region segmentation, or 2D tumour / no-tumour slices) or a
2D image folder with one sub-folder per class. Samples are loaded once and kept in
memory (the small cohorts this runs on fit easily) and split with a seeded,
class-stratified draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["TrainingData", "InMemoryDataset", "load_training_data", "parse_size", "augment_training_set"]



class InMemoryDataset(Dataset):
    """A list of ``(image, target)`` tensor pairs as a Dataset."""

    def __init__(self, items: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@dataclass
class TrainingData:
    """Train / validation sets plus what a checkpoint must remember about them."""

    train: InMemoryDataset
    val: InMemoryDataset | None
    kind: str
    input_size: tuple[int, ...]
    channel_names: list[str]
    class_names: list[str] | None = None
    region_names: list[str] | None = None
    preprocessing: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Input channels."""
        return len(self.channel_names)

    @property
    def default_model(self) -> str:
        """The zoo model that fits this data and task."""
        if self.region_names:
            return "unet3d"
        return "classifier3d" if len(self.input_size) == 3 else "cnn2d"


def parse_size(text, dims: int) -> tuple[int, ...] | None:
    """``64`` / ``"64"`` / ``"48,56,40"`` / a sequence -> a ``dims``-tuple of sides (None stays None)."""
    if text is None:
        return None
    if isinstance(text, (int, str)):
        try:
            sides = [int(s) for s in str(text).replace("x", ",").split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"size must be integers like 64 or 48,56,40, got {text!r}") from None
    else:
        sides = [int(s) for s in text]
    if len(sides) == 1:
        sides = sides * dims
    if len(sides) != dims or min(sides) < 1:
        raise ValueError(f"size needs 1 or {dims} positive sides for {dims}D data, got {text!r}")
    return tuple(sides)


def _materialise(dataset, desc: str, progress: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from tqdm.auto import tqdm

    items = []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False):
        x, y = dataset[i]
        items.append((torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)))
    return items


def _is_cohort(root: Path) -> bool:
    from ..data.brats import find_brats_cases

    try:
        return bool(find_brats_cases(root))
    except (FileNotFoundError, ValueError):
        return False


def load_training_data(root: str | os.PathLike, task: str = "classify", slices: bool = False, size=None,
                       resolution: int | None = None, channels: int = 1, val_fraction: float = 0.2,
                       seed: int = 0, progress: bool = True) -> TrainingData:
    """Load ``root`` for ``task`` (see the module docstring) and split it into train / validation."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found")
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    cohort = _is_cohort(root)
    if slices and not cohort:
        raise ValueError(f"slices are taken from a BraTS / phantom cohort, but {root} holds no case folders")
    if task == "segment" and not cohort:
        raise ValueError(f"segmentation needs a BraTS / phantom cohort with *_seg files; {root} holds no case folders")
    prep: dict = {"resolution_mm": resolution}
    if slices:
        from ..data.datasets import SliceDataset

        size2 = parse_size(size, 2)
        dataset = SliceDataset(root, size=size2) if size2 is not None else SliceDataset(root)
        kind, channel_names = "cohort-slices", list(dataset.modalities)
        class_names = list(getattr(dataset, "class_names", ["no tumour", "tumour"]))
        prep.update(normalise="zscore per modality over brain voxels", slice_axis="axial", size=size2)
    elif cohort:
        from ..data.datasets import BratsCohortDataset
        from ..data.preprocess import default_crop_size

        size3 = parse_size(size, 3)
        if size3 is None and resolution is not None:
            size3 = tuple(default_crop_size(resolution))
        dataset = BratsCohortDataset(root, task="grade" if task == "classify" else "segment", size=size3)
        channel_names = list(dataset.modalities)
        kind = "cohort-grade" if task == "classify" else "cohort-regions"
        class_names = list(getattr(dataset, "class_names", ["LGG", "HGG"])) if task == "classify" else None
        prep.update(normalise="zscore per modality over brain voxels", crop_or_pad=size3, orientation="RAS")
    else:
        from ..data.datasets import ImageFolderDataset

        size2 = parse_size(size if size is not None else 64, 2)
        dataset = ImageFolderDataset(root, size=size2, channels=channels)
        kind = "image-folder"
        class_names = list(getattr(dataset, "class_names", None) or getattr(dataset, "classes"))
        channel_names = ["grey"] if channels == 1 else ["red", "green", "blue"]
        prep.update(resize=size2, channels=channels, scale=getattr(dataset, "scaling", "[0, 1]"))
    if len(dataset) == 0:
        raise ValueError(f"no samples found in {root}")
    items = _materialise(dataset, "loading", progress)
    if cohort and prep.get("resolution_mm") is None:
        prep["resolution_mm"] = round(float(sum(dataset.case(0).meta.zooms[:3])) / 3, 3) \
            if hasattr(dataset, "case") else None
    if slices:
        prep["size"] = list(items[0][0].shape[1:])
    if "crop_or_pad" in prep:
        prep["crop_or_pad"] = list(items[0][0].shape[1:])
        prep["crop_centre"] = "brain (non-zero voxels) centre"
    labels = [int(y) if y.ndim == 0 else 0 for _, y in items] if task == "classify" else [0] * len(items)
    if task == "classify" and len(set(labels)) < 2:
        raise ValueError(f"{root}: every sample has class {class_names[labels[0]] if class_names else labels[0]}; "
                         "a classifier needs at least two classes")
    from ..data.datasets import split_indices

    # slices of one case stay on one side of the split: neighbours would leak into validation
    train_idx, val_idx = split_indices(len(items), val_fraction, seed, labels=labels,
                                       groups=getattr(dataset, "groups", None))
    train = InMemoryDataset([items[i] for i in train_idx])
    val = InMemoryDataset([items[i] for i in val_idx]) if val_idx else None
    return TrainingData(train=train, val=val, kind=kind, input_size=tuple(items[0][0].shape[1:]),
                        channel_names=channel_names, class_names=class_names,
                        region_names=list(dataset.region_names) if task == "segment" else None,
                        preprocessing=prep)


def augment_training_set(data: TrainingData, patch=None, per_case: int = 2, flip: bool = False,
                         seed: int = 0) -> TrainingData:
    """Train on random patches of ``patch`` size (``per_case`` per sample per epoch) and/or random
    left-right flips (first spatial axis, RAS); validation stays on whole samples."""
    if patch is None and not flip:
        return data
    from .patches import RandomPatches

    dims = len(data.input_size)
    size = parse_size(patch, dims) if patch is not None else data.input_size
    if any(p > n for p, n in zip(size, data.input_size)):
        raise ValueError(f"patch {size} is larger than the samples {data.input_size}")
    data.train = RandomPatches(data.train, size, per_case=per_case if patch is not None else 1, seed=seed,
                               flip_axes=(0,) if flip else ())
    data.preprocessing["training_patches"] = {"size": list(size), "per_case": data.train.per_case,
                                              "left_right_flips": bool(flip)}
    return data
