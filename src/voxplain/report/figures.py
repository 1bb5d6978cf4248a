"""PNG figures with matplotlib: the method comparison grid and the layer-by-layer grid.

Volumes are shown as one axial slice (RAS voxel order: x to the right, y up);
2D images as they are stored (row 0 at the top). Maps are shown as magnitudes,
channels reduced and scaled to their 99th percentile (:func:`display_map`), in a
perceptually uniform colour map with a colour bar that says so. The slice is
the one that cuts the target's region widest (ground truth when known, else the
model's prediction, else the attribution), and the region's outline is drawn.
A map that is empty or constant is not drawn as a black panel: its panel says so.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..atomic import atomic_file  # noqa: E402
from .notes import map_notes, map_state  # noqa: E402
from .study import Study  # noqa: E402
from .volumes import as_numpy, best_slice, display_image, display_map  # noqa: E402

__all__ = ["GridRow", "comparison_grid", "study_rows", "inspection_grid", "filter_grid", "MAP_CMAP",
           "MAP_NORMALISATION", "TRUTH_COLOUR", "PREDICTION_COLOUR"]

MAP_CMAP = "inferno"
#: how every attribution panel is scaled (the colour bar's label)
MAP_NORMALISATION = "|attribution| summed over channels; each map scaled so its 99th percentile = 1"
TRUTH_COLOUR = "#3cf03c"
PREDICTION_COLOUR = "#20d0ff"
_CELL = 1.6  # inches per panel
_LABEL_WIDTH = 1.45  # inches left of the first column for row labels
_FOOTER = 0.95  # inches below the panels: colour bar, legend, notes


@dataclass
class GridRow:
    """One row of the comparison grid: a label, the input (C, *spatial) and its maps by method.

    ``truth`` / ``predicted``: the target's ground-truth and predicted region (*spatial),
    which choose the slice and are outlined; ``notes``: method -> what its panel must say.
    """

    label: str
    image: np.ndarray
    channels: list[str]
    maps: dict[str, np.ndarray]
    ras_plane: bool = False
    truth: np.ndarray | None = None
    predicted: np.ndarray | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)


def study_rows(study: Study) -> list[GridRow]:
    """One grid row per explained target of ``study``."""
    rows = []
    for target, maps in study.maps.items():
        info = study.info(target)
        rows.append(GridRow(info.pooling or str(target), study.image, study.channels, maps, study.ras_plane,
                            info.truth, info.predicted, {m: map_notes(study, target, m) for m in maps}))
    return rows


def _slice(array: np.ndarray, z: int | None, ras_plane: bool = False) -> np.ndarray:
    """A 2D panel to draw with ``imshow(origin='upper')``."""
    if array.ndim == 3:  # (X, Y, Z) RAS: axial slice, y up
        return array[:, :, z].T[::-1]
    if ras_plane:  # (X, Y) RAS plane
        return array.T[::-1]
    return array


def region_slice(truth, predicted, fallback: np.ndarray | None) -> tuple[int | None, str]:
    """The axial slice that cuts the target's region widest, and what chose it.

    Ground truth when known, else the prediction, else ``fallback`` (e.g. the summed
    attribution); None for 2D inputs.
    """
    for mask, why in ((truth, "ground truth"), (predicted, "prediction")):
        if mask is not None and np.ndim(mask) == 3 and np.any(mask):
            return best_slice(np.asarray(mask, np.float32), axis=-1), why
    if fallback is not None and np.ndim(fallback) == 3:
        return best_slice(fallback, axis=-1), "attribution"
    return None, ""


def _outline(ax, mask, z, ras_plane: bool, colour: str, dashed: bool = False) -> bool:
    if mask is None:
        return False
    panel = _slice(np.asarray(mask, np.float32), z, ras_plane)
    if not panel.any():
        return False
    ax.contour(panel, levels=[0.5], colors=[colour], linewidths=0.9, linestyles="--" if dashed else "-")
    return True


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines: list[str] = []
    for part in text.split("\n"):
        lines += textwrap.wrap(part, width) or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["... (see report)"]
    return "\n".join(lines)


def _blank(ax, shape, message: str) -> None:
    """A light grey panel that says why there is nothing to draw."""
    ax.imshow(np.full(shape, 0.88), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.text(0.5, 0.5, _wrap(message, 21, 9), transform=ax.transAxes, ha="center", va="center", fontsize=6.3,
            color="#7a0000", linespacing=1.1)


def _sides(ax) -> None:
    """Mark the subject's left and right on a RAS panel (x to the right: the neurological convention)."""
    for x, text, ha in ((0.02, "L", "left"), (0.98, "R", "right")):
        ax.text(x, 0.5, text, transform=ax.transAxes, ha=ha, va="center", fontsize=7, color="white",
                fontweight="bold", bbox=dict(facecolor="black", alpha=0.6, edgecolor="none", pad=0.5))


def _note(ax, notes: Sequence[str]) -> None:
    """Warnings under a drawn map, inside its panel."""
    ax.text(0.02, 0.02, _wrap("; ".join(notes), 26, 4), transform=ax.transAxes, ha="left", va="bottom",
            fontsize=5.5, color="#7a0000", bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=1))


def _save(fig, path, left: float = 0.5, bottom: float = 0.05) -> None:
    # fixed margins: a "tight" bounding box measures every text artist and costs more than the drawing
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - 0.05 / w, bottom=bottom / h, top=1 - 0.6 / h, wspace=0.05,
                        hspace=0.25)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _colourbar(fig, label: str, bottom: float) -> None:
    """A horizontal colour bar in the footer, ``bottom`` inches above the figure's lower edge."""
    w, h = fig.get_size_inches()
    width = min(4.0, w - 2 * _LABEL_WIDTH) if w > 2 * _LABEL_WIDTH + 1 else w * 0.6
    cax = fig.add_axes([(w - width) / 2 / w, bottom / h, width / w, 0.12 / h])
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=MAP_CMAP), cax=cax,
                      orientation="horizontal", ticks=[0, 0.5, 1])
    cb.ax.tick_params(labelsize=7, length=2, pad=1)
    cb.set_label(label, fontsize=7, labelpad=2)


def _footer(fig, lines: Sequence[str], handles: Sequence[Line2D]) -> None:
    w, h = fig.get_size_inches()
    if handles:
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.1 / w, 0.5 / h), fontsize=7,
                   frameon=False, ncol=1, handlelength=2)
    if lines:
        fig.text(0.1 / w, 0.08 / h, _wrap("\n".join(lines), 160, 4), fontsize=7, color="#7a0000",
                 ha="left", va="bottom")


def _legend(truth_drawn: bool, predicted_drawn: bool) -> list[Line2D]:
    handles = []
    if truth_drawn:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, lw=1.2, label="ground truth"))
    if predicted_drawn:
        handles.append(Line2D([], [], color=PREDICTION_COLOUR, lw=1.2, ls="--", label="model's prediction"))
    return handles


def comparison_grid(path: str | os.PathLike, rows: Sequence[GridRow], title: str | None = None,
                    notes: Sequence[str] = ()) -> None:
    """Input channels, then one column per method; one row per case or target (NeuroXAI Figs. 3-4).

    ``notes``: lines printed under the grid (e.g. targets that were skipped and why).
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    methods: list[str] = []
    for r in rows:
        methods += [m for m in r.maps if m not in methods]
    n_ch = max(len(r.channels) for r in rows)
    n_cols = n_ch + len(methods)
    fig, axes = plt.subplots(len(rows), n_cols, squeeze=False,
                             figsize=(_CELL * n_cols + _LABEL_WIDTH, _CELL * len(rows) + 0.6 + _FOOTER))
    truth_drawn = predicted_drawn = False
    for i, row in enumerate(rows):
        shown = {m: display_map(row.maps[m])[0] for m in row.maps}
        total = sum(shown.values()) if shown else (np.abs(row.image).sum(0) if row.image.ndim == 4 else None)
        z, _ = region_slice(row.truth, row.predicted, total if row.image.ndim == 4 else None)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for c, name in enumerate(row.channels):
            ax = axes[i, c]
            ax.imshow(_slice(display_image(row.image[c]), z, row.ras_plane), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            truth_drawn |= _outline(ax, row.truth, z, row.ras_plane, TRUTH_COLOUR)
            predicted_drawn |= _outline(ax, row.predicted, z, row.ras_plane, PREDICTION_COLOUR, dashed=True)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if c == 0 and (row.image.ndim == 4 or row.ras_plane):
                _sides(ax)
        panel_shape = _slice(display_image(row.image[0]), z, row.ras_plane).shape
        for j, m in enumerate(methods):
            ax = axes[i, n_ch + j]
            if i == 0:
                ax.set_title(m.replace("_", " "), fontsize=9)
            if m not in shown:
                continue
            notes_m = row.notes.get(m, [])
            if map_state(row.maps[m]) is not None:
                _blank(ax, panel_shape, "\n".join(notes_m) or "map is empty")
                continue
            ax.imshow(_slice(shown[m], z, row.ras_plane), cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
            region = row.truth if row.truth is not None and np.any(row.truth) else row.predicted
            _outline(ax, region, z, row.ras_plane, TRUTH_COLOUR if region is row.truth else PREDICTION_COLOUR,
                     dashed=region is not row.truth)
            if notes_m:
                _note(ax, notes_m)
        label = _wrap(row.label, 22, 7) + (f"\naxial z={z}" if z is not None else "")
        axes[i, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
    if title:
        fig.suptitle(title, fontsize=11)
    _colourbar(fig, MAP_NORMALISATION, bottom=0.55)
    _footer(fig, list(notes), _legend(truth_drawn, predicted_drawn))
    _save(fig, path, left=_LABEL_WIDTH, bottom=_FOOTER + 0.05)


def _panel_grid(n: int) -> tuple[int, int]:
    cols = min(n, 6)
    return (n + cols - 1) // cols, cols


def inspection_grid(path: str | os.PathLike, image, layers: dict[str, np.ndarray], channel: int = -1,
                    title: str | None = None, ras_plane: bool = False, labels: dict[str, str] | None = None,
                    truth=None, predicted=None) -> None:
    """Grad-CAM of every layer in network order over the input (NeuroXAI Fig. 5).

    ``image`` (C, *spatial); ``layers`` maps a layer name to its upsampled CAM (1, *spatial);
    ``labels`` gives each layer a short name (default: the name); ``truth`` / ``predicted``
    the target's regions (*spatial), which choose the slice and are outlined.
    """
    image = as_numpy(image)
    if not layers:
        raise ValueError("inspection_grid needs at least one layer map")
    labels = labels or {}
    cams = {name: display_map(m, "sum")[0] for name, m in layers.items()}
    fallback = None
    if image.ndim == 4:  # the slice where the layers look inside the object (not at its borders)
        fallback = sum(cams.values()) * (np.abs(image).sum(0) > 0)
    z, _ = region_slice(truth, predicted, fallback)
    base = _slice(display_image(image[channel]), z, ras_plane)
    rows, cols = _panel_grid(len(cams) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(_CELL * cols + 0.5, _CELL * rows + 0.6 + _FOOTER), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    cmap = matplotlib.colormaps[MAP_CMAP]
    axes.flat[0].imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    truth_drawn = _outline(axes.flat[0], truth, z, ras_plane, TRUTH_COLOUR)
    predicted_drawn = _outline(axes.flat[0], predicted, z, ras_plane, PREDICTION_COLOUR, dashed=True)
    axes.flat[0].set_title("input" + (f" (axial z={z})" if z is not None else ""), fontsize=8)
    if image.ndim == 4 or ras_plane:
        _sides(axes.flat[0])
    for ax, (name, cam) in zip(axes.flat[1:], cams.items()):
        # the anatomy dimmed, so a bright (e.g. FLAIR) lesion cannot pass for a strong CAM
        ax.imshow(0.5 * base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        state = map_state(layers[name])
        if state is None:
            panel = _slice(cam, z, ras_plane)
            rgba = cmap(panel)
            rgba[..., 3] = 0.8 * np.sqrt(panel)  # faint where the CAM is weak, so the anatomy stays visible
            ax.imshow(rgba, interpolation="nearest")
        else:
            reason = ": ReLU of the gradient-weighted feature maps is zero everywhere" if state == "all zero" else ""
            ax.text(0.5, 0.5, _wrap(f"CAM {state}{reason}", 22, 6), transform=ax.transAxes, ha="center",
                    va="center", fontsize=6, color="#7a0000",
                    bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=2))
        region = truth if truth is not None and np.any(truth) else predicted
        _outline(ax, region, z, ras_plane, TRUTH_COLOUR if region is truth else PREDICTION_COLOUR,
                 dashed=region is not truth)
        ax.set_title(labels.get(name, name), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    _colourbar(fig, "Grad-CAM; each layer scaled so its 99th percentile = 1", bottom=0.55)
    _footer(fig, [], _legend(truth_drawn, predicted_drawn))
    _save(fig, path, bottom=_FOOTER + 0.05)


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
