"""What one report section shows: an input, its maps per target and method, and how they were made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .volumes import as_numpy, spatial_dims

__all__ = ["Study", "TargetInfo"]


@dataclass
class TargetInfo:
    """What one target of a study explains and what is known about its maps.

    Attributes:
        pooling: how the explained score is made, e.g. ``"WT logit, mean over 812 predicted voxels"``.
        predicted: the voxels the model predicts as this class (*spatial) bool, segmentation only.
        truth: the ground truth of this class/region (*spatial) bool, when the case has one.
        warnings: method -> warnings about its map (from the method, e.g. unguided activations).
        completeness: method -> IG-type completeness check: ``{"error": relative error, ...}``.
    """

    pooling: str = ""
    predicted: Any = None
    truth: Any = None
    warnings: dict[str, list[str]] = field(default_factory=dict)
    completeness: dict[str, dict[str, Any]] = field(default_factory=dict)

    def focus(self) -> Any:
        """The mask that locates this target: the ground truth when known, else the prediction (or None)."""
        for mask in (self.truth, self.predicted):
            if mask is not None and np.any(mask):
                return mask
        return None


@dataclass
class Study:
    """One explained input.

    Attributes:
        name: shown as the section title (e.g. ``"grade (3D classifier)"``).
        image: the input of the model for one sample, (C, *spatial); 2D images are
            (C, H, W) in row/column order, volumes (C, X, Y, Z) in RAS voxel order.
        channels: a name per channel (e.g. ``["t1", "t1ce", "t2", "flair"]``).
        maps: target label -> method name -> raw map (C or 1, *spatial) of the input's spatial shape.
        prediction: what the model predicted, JSON-friendly (label, score, probabilities...).
        settings: how the maps were made: per-method options and seconds, target, model...
        spacing: voxel size per spatial axis (mm), for the viewer's aspect ratio.
        layers: optional network inspection: layer name -> Grad-CAM map (1, *spatial).
        ras_plane: a 2D input that is a slice of a RAS volume, (C, X, Y): shown with
            x to the right and y up instead of as rows and columns.
        targets: target label -> :class:`TargetInfo` (pooling, regions, warnings), where known.
        skipped: target label -> why it was not explained (e.g. "model predicts no ET voxels").
        predicted_labels: the model's predicted label map (*spatial) for segmentation models,
            written as ``prediction.nii.gz``.
        layer_labels: layer name -> its title in the layer-by-layer figure (e.g. ``"enc 1 · 24×32×24"``).
    """

    name: str
    image: Any
    channels: list[str]
    maps: dict[str, dict[str, Any]]
    prediction: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    ras_plane: bool = False
    targets: dict[str, TargetInfo] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    predicted_labels: Any = None
    layer_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = as_numpy(self.image)
        dims = spatial_dims(self.image)
        if len(self.channels) != self.image.shape[0]:
            raise ValueError(f"study {self.name!r}: {len(self.channels)} channel name(s) for an image with "
                             f"{self.image.shape[0]} channel(s)")
        spatial = self.image.shape[1:]
        for target, per_method in self.maps.items():
            for method, m in per_method.items():
                m = as_numpy(m)
                if m.ndim == dims:
                    m = m[None]
                if m.shape[1:] != spatial:
                    raise ValueError(f"study {self.name!r}: map {target}/{method} has spatial shape "
                                     f"{m.shape[1:]}, the image has {spatial}")
                per_method[method] = m
        for name, m in list(self.layers.items()):
            m = as_numpy(m)
            self.layers[name] = m[None] if m.ndim == dims else m
        for label, info in self.targets.items():
            for mask in (info.predicted, info.truth):
                if mask is not None and tuple(np.shape(mask)) != tuple(spatial):
                    raise ValueError(f"study {self.name!r}: target {label} has a mask of shape {np.shape(mask)}, "
                                     f"the image has {spatial}")
        if self.spacing is None:
            self.spacing = (1.0,) * dims
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def is_volume(self) -> bool:
        """True for 3D inputs."""
        return self.image.ndim == 4

    def info(self, target: str) -> TargetInfo:
        """The :class:`TargetInfo` of ``target`` (an empty one when none was given)."""
        return self.targets.get(target) or TargetInfo()

    def methods(self) -> list[str]:
        """Method names over all targets, in first-seen order."""
        seen: list[str] = []
        for per_method in self.maps.values():
            for m in per_method:
                if m not in seen:
                    seen.append(m)
        return seen
