"""What one report section shows: an input, its maps per target and method, and how they were made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .volumes import as_numpy, spatial_dims

__all__ = ["Study"]


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
        if self.spacing is None:
            self.spacing = (1.0,) * dims
        self.spacing = tuple(float(s) for s in self.spacing)

    @property
    def is_volume(self) -> bool:
        """True for 3D inputs."""
        return self.image.ndim == 4

    def methods(self) -> list[str]:
        """Method names over all targets, in first-seen order."""
        seen: list[str] = []
        for per_method in self.maps.values():
            for m in per_method:
                if m not in seen:
                    seen.append(m)
        return seen
