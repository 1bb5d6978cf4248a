"""PNG figures with matplotlib: the method comparison grid and the layer-by-layer grid.

Volumes are shown as one axial slice (RAS voxel order: x to the right, y up);
2D images as they are stored (row 0 at the top). Maps are shown as magnitudes,
channels reduced and scaled to their 99th percentile (:func:`display_map`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_file  # noqa: E402
from .study import Study  # noqa: E402
from .volumes import as_numpy, best_slice, display_image, display_map  # noqa: E402

__all__ = ["GridRow", "comparison_grid", "study_rows", "inspection_grid", "filter_grid", "MAP_CMAP"]

MAP_CMAP = "inferno"
_CELL = 1.6  # inches per panel


@dataclass
class GridRow:
    """One row of the comparison grid: a label, the input (C, *spatial) and its maps by method."""

    label: str
    image: np.ndarray
    channels: list[str]
    maps: dict[str, np.ndarray]
    ras_plane: bool = False


def study_rows(study: Study) -> list[GridRow]:
    """One grid row per target of ``study``."""
    return [GridRow(str(target), study.image, study.channels, maps, study.ras_plane)
            for target, maps in study.maps.items()]


def _slice(array: np.ndarray, z: int | None, ras_plane: bool = False) -> np.ndarray:
    """A 2D panel to draw with ``imshow(origin='upper')``."""
    if array.ndim == 3:  # (X, Y, Z) RAS: axial slice, y up
        return array[:, :, z].T[::-1]
    if ras_plane:  # (X, Y) RAS plane
        return array.T[::-1]
    return array


def _save(fig, path) -> None:
    # fixed margins: a "tight" bounding box measures every text artist and costs more than the drawing
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.5 / w, right=1 - 0.05 / w, bottom=0.05 / h, top=1 - 0.6 / h, wspace=0.05,
                        hspace=0.25)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def comparison_grid(path: str | os.PathLike, rows: Sequence[GridRow], title: str | None = None) -> None:
    """Input channels, then one column per method; one row per case or class (NeuroXAI Figs. 3-4)."""
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    methods: list[str] = []
    for r in rows:
        methods += [m for m in r.maps if m not in methods]
    n_ch = max(len(r.channels) for r in rows)
    n_cols = n_ch + len(methods)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(_CELL * n_cols + 0.5, _CELL * len(rows) + 0.6),
                             squeeze=False)
    for i, row in enumerate(rows):
        shown = {m: display_map(row.maps[m])[0] for m in row.maps}
        z = None
        if row.image.ndim == 4:
            total = sum(shown.values()) if shown else row.image.sum(0)
            z = best_slice(total, axis=-1)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for c, name in enumerate(row.channels):
            axes[i, c].imshow(_slice(display_image(row.image[c]), z, row.ras_plane), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            if i == 0:
                axes[i, c].set_title(name, fontsize=9)
        for j, m in enumerate(methods):
            ax = axes[i, n_ch + j]
            if i == 0:
                ax.set_title(m.replace("_", " "), fontsize=9)
            if m in shown:
                ax.imshow(_slice(shown[m], z, row.ras_plane), cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
        label = row.label + (f"\naxial z={z}" if z is not None else "")
        axes[i, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


def _panel_grid(n: int) -> tuple[int, int]:
    cols = min(n, 6)
    return (n + cols - 1) // cols, cols


def inspection_grid(path: str | os.PathLike, image, layers: dict[str, np.ndarray], channel: int = -1,
                    title: str | None = None, ras_plane: bool = False) -> None:
    """Grad-CAM of every layer in network order over the input (NeuroXAI Fig. 5).

    ``image`` (C, *spatial); ``layers`` maps a layer name to its upsampled CAM (1, *spatial).
    """
    image = as_numpy(image)
    if not layers:
        raise ValueError("inspection_grid needs at least one layer map")
    cams = {name: display_map(m, "sum")[0] for name, m in layers.items()}
    z = None
    if image.ndim == 4:  # the slice where the layers look inside the object (not at its borders)
        z = best_slice(sum(cams.values()) * (np.abs(image).sum(0) > 0), axis=-1)
    base = display_image(image[channel])
    rows, cols = _panel_grid(len(cams) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(_CELL * cols + 0.5, _CELL * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes.flat[0].imshow(_slice(base, z, ras_plane), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.flat[0].set_title("input", fontsize=8)
    for ax, (name, cam) in zip(axes.flat[1:], cams.items()):
        ax.imshow(_slice(base, z, ras_plane), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(_slice(cam, z, ras_plane), cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="nearest")
        ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


def filter_grid(path: str | os.PathLike, activations, layer: str, max_filters: int = 32) -> None:
    """Per-filter activation maps of one layer, (K, *spatial) for one sample; volumes at their busiest slice."""
    acts = as_numpy(activations)
    if acts.ndim not in (3, 4):
        raise ValueError(f"expected activations (K, *spatial) with 2 or 3 spatial dims, got {acts.shape}")
    acts = acts[:max_filters]
    z = best_slice(np.abs(acts).sum(0), axis=-1) if acts.ndim == 4 else None
    rows, cols = _panel_grid(len(acts))
    fig, axes = plt.subplots(rows, cols, figsize=(_CELL * cols + 0.5, _CELL * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (ax, a) in enumerate(zip(axes.flat, acts)):
        ax.imshow(_slice(a, z), cmap="viridis", interpolation="nearest")
        ax.set_title(f"filter {k}", fontsize=7)
    fig.suptitle(f"activations of {layer}" + (f" (axial z={z})" if z is not None else ""), fontsize=10)
    _save(fig, path)
