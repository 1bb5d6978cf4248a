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

__all__ = ["TrainingData", "InMemoryDataset", "load_training_data", "load_heldout_items", "parse_size",
           "augment_training_set"]



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
            return "unet3d_interp"
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


@dataclass
class _Loaded:
    """One folder's samples, before any split."""

    dataset: Dataset
    items: list
    kind: str
    channel_names: list[str]
    class_names: list[str] | None
    preprocessing: dict


def _load_folder(root: Path, task: str, slices: bool, size, resolution: int | None, channels: int,
                 progress: bool, desc: str = "loading") -> _Loaded:
    """Read every sample of ``root`` (a cohort or an image folder) into memory."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found")
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
        prep.update(normalise=_ZSCORE + " (of the whole volume, before slicing)", orientation="RAS",
                    slice_axis="axial", slice_plane="(X, Y) = (R, A)", size=size2,
                    crop_centre="brain (non-zero voxels) centre, in plane")
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
        prep.update(normalise=_ZSCORE, crop_or_pad=size3, orientation="RAS")
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
    items = _materialise(dataset, desc, progress)
    if cohort:
        spacing = [round(float(z), 3) for z in dataset.case(0).meta.zooms[:3]] if hasattr(dataset, "case") \
            else [round(float(z), 3) for z in _first_case_zooms(dataset)]
        prep["spacing_mm"] = spacing
        if prep.get("resolution_mm") is None:
            prep["resolution_mm"] = round(sum(spacing) / 3, 3)
    if slices:
        prep["size"] = list(items[0][0].shape[1:])
    if "crop_or_pad" in prep:
        prep["crop_or_pad"] = list(items[0][0].shape[1:])
        prep["crop_centre"] = "brain (non-zero voxels) centre"
    return _Loaded(dataset, items, kind, channel_names, class_names, prep)


#: the intensity normalisation of cohort samples (voxplain.data.preprocess.zscore_nonzero)
_ZSCORE = "zscore per modality over brain voxels"


def _first_case_zooms(dataset) -> tuple[float, ...]:
    from ..data.brats import load_brats_case

    return load_brats_case(dataset.cases[0], dataset.modalities, require_seg=False).meta.zooms[:3]


def _class_labels(loaded: _Loaded, task: str, root: Path) -> list[int]:
    labels = [int(y) if y.ndim == 0 else 0 for _, y in loaded.items] if task == "classify" else [0] * len(loaded.items)
    if task == "classify" and len(set(labels)) < 2:
        names = loaded.class_names
        raise ValueError(f"{root}: every sample has class {names[labels[0]] if names else labels[0]}; "
                         "a classifier needs at least two classes")
    return labels


def load_training_data(root: str | os.PathLike, task: str = "classify", slices: bool = False, size=None,
                       resolution: int | None = None, channels: int = 1, val_fraction: float = 0.2,
                       seed: int = 0, progress: bool = True,
                       val_root: str | os.PathLike | None = None) -> TrainingData:
    """Load ``root`` for ``task`` (see the module docstring) and split it into train / validation.

    With ``val_root`` (a second folder of the same kind) the validation set is that
    folder, read with the same settings, and ``root`` is all training data.
    """
    root = Path(root)
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    loaded = _load_folder(root, task, slices, size, resolution, channels, progress)
    labels = _class_labels(loaded, task, root)
    items = loaded.items
    if val_root is not None:
        like = TrainingData(train=InMemoryDataset([]), val=None, kind=loaded.kind,
                            input_size=tuple(items[0][0].shape[1:]), channel_names=loaded.channel_names,
                            class_names=loaded.class_names, preprocessing=loaded.preprocessing)
        val_items = load_heldout_items(val_root, task, slices, like, channels, progress)
        train_idx, val_idx = list(range(len(items))), []
    else:
        from ..data.datasets import split_indices

        val_items = None
        # slices of one case stay on one side of the split: neighbours would leak into validation
        train_idx, val_idx = split_indices(len(items), val_fraction, seed, labels=labels,
                                           groups=getattr(loaded.dataset, "groups", None))
    train = InMemoryDataset([items[i] for i in train_idx])
    if val_items is not None:
        val = InMemoryDataset(val_items)
    else:
        val = InMemoryDataset([items[i] for i in val_idx]) if val_idx else None
    return TrainingData(train=train, val=val, kind=loaded.kind, input_size=tuple(items[0][0].shape[1:]),
                        channel_names=loaded.channel_names, class_names=loaded.class_names,
                        region_names=list(loaded.dataset.region_names) if task == "segment" else None,
                        preprocessing=loaded.preprocessing)


def load_heldout_items(root: str | os.PathLike, task: str, slices: bool, like, channels: int = 1,
                       progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The samples of a held-out folder (validation or test), prepared exactly like ``like``'s.

    ``like`` is the training data (:class:`TrainingData`): same kind of folder, input size, voxel spacing and classes, else a ``ValueError`` says
    what differs.
    """
    root = Path(root)
    size = list(like.input_size)
    prep = like.preprocessing
    loaded = _load_folder(root, task, slices, size, None, channels, progress, desc=f"loading {root.name}")
    if loaded.kind != like.kind:
        raise ValueError(f"{root} holds {loaded.kind} data but the training data are {like.kind}")
    if loaded.class_names != like.class_names:
        raise ValueError(f"{root}: classes {loaded.class_names} differ from the training data's {like.class_names}")
    train_spacing, spacing = prep.get("spacing_mm"), loaded.preprocessing.get("spacing_mm")
    if train_spacing and spacing and any(abs(a - b) > 1e-3 for a, b in zip(train_spacing, spacing)):
        raise ValueError(f"{root}: voxel spacing {spacing} mm differs from the training data's {train_spacing} mm")
    return loaded.items


def augment_training_set(data: TrainingData, patch=None, per_case: int = 2, flip: bool = False,
                         seed: int = 0, shift: int = 0, intensity: float = 0.0) -> TrainingData:
    """Train on random patches of ``patch`` size (``per_case`` per sample per epoch) and/or augment:
    random left-right flips (first spatial axis, RAS), shifts of up to ``shift`` voxels per axis,
    intensity jitter ``intensity`` (see :class:`~voxplain.models.patches.RandomPatches`).
    Validation stays on whole, unchanged samples."""
    if patch is None and not flip and not shift and not intensity:
        return data
    from .patches import RandomPatches

    dims = len(data.input_size)
    size = parse_size(patch, dims) if patch is not None else data.input_size
    if any(p > n for p, n in zip(size, data.input_size)):
        raise ValueError(f"patch {size} is larger than the samples {data.input_size}")
    data.train = RandomPatches(data.train, size, per_case=per_case if patch is not None else 1, seed=seed,
                               flip_axes=(0,) if flip else (), shift=shift, intensity=intensity)
    data.preprocessing["training_patches"] = {"size": list(size), "per_case": data.train.per_case,
                                              "left_right_flips": bool(flip), "shift_voxels": int(shift),
                                              "intensity_jitter": float(intensity)}
    return data
