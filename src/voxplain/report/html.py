"""``report.html``: one self-contained page (inline script, style, data and figures; no network).

Volumes are embedded as uint8, zlib-compressed and base64-encoded, downsampled
by block averaging when larger than ``max_voxels``; the page decompresses them
with the browser's built-in ``DecompressionStream``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from ..atomic import atomic_file
from .figures import MAP_CMAP
from .notes import map_notes, map_state
from .prediction import prediction_table
from .regions import region_centre
from .settings import settings_html
from .study import Study
from .volumes import display_image, display_map, downsample, quantise

__all__ = ["render_html", "write_html", "DEFAULT_MAX_VOXELS"]

#: voxels per embedded volume (about 64^3); larger volumes are block-averaged
DEFAULT_MAX_VOXELS = 64**3


def _pack(values: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(quantise(values).tobytes(order="C"), 6)).decode("ascii")


def _as_volume(a: np.ndarray, ras_plane: bool = False) -> np.ndarray:
    """(H, W) image -> (W, H, 1) in the viewer's (x right, y up, z) order; a RAS (X, Y) plane -> (X, Y, 1);
    volumes unchanged."""
    if a.ndim == 2:
        return np.ascontiguousarray(a[:, :, None] if ras_plane else a[::-1].T[:, :, None])
    return a


def _pack_mask(mask, ras_plane: bool, max_voxels: int) -> str | None:
    if mask is None or not np.any(mask):
        return None
    vol, _ = downsample(_as_volume(np.asarray(mask, np.float32), ras_plane), max_voxels)
    return _pack((vol >= 0.5).astype(np.float32))


def _focus(mask, ras_plane: bool, max_voxels: int) -> list[int] | None:
    """The region's centre in the viewer's (downsampled) voxels."""
    if mask is None or not np.any(mask):
        return None
    vol, _ = downsample(_as_volume(np.asarray(mask, np.float32), ras_plane), max_voxels)
    return region_centre(vol >= 0.5) or region_centre(vol > 0)


def _study_payload(study: Study, max_voxels: int) -> dict[str, Any]:
    images, factor, dims = [], 1, []
    for c in range(study.image.shape[0]):
        vol, factor = downsample(_as_volume(display_image(study.image[c]), study.ras_plane), max_voxels)
        images.append(_pack(vol))
        dims = list(vol.shape)
    overlays: dict[str, dict[str, Any]] = {}
    targets: dict[str, dict[str, Any]] = {}
    focus_total = None
    for target, per_method in study.maps.items():
        overlays[target] = {}
        info = study.info(target)
        for method, m in per_method.items():
            shown, vmax = display_map(m)
            shown = _as_volume(shown, study.ras_plane)
            focus_total = shown if focus_total is None else focus_total + shown
            vol, _ = downsample(shown, max_voxels)
            info_text = (f"{method.replace('_', ' ')}: |map| summed over {m.shape[0]} channel(s), scaled so its "
                         f"99th percentile ({vmax:.3g}) = 1")
            check = info.completeness.get(method)
            if check is not None:
                info_text += (f"; completeness error {check['error']:.2%} (|sum of the map - (F(x) - F(baseline))| "
                              "/ |F(x) - F(baseline)|)")
            overlays[target][method] = {"data": _pack(vol), "vmax": vmax, "info": info_text,
                                        "state": map_state(m), "notes": map_notes(study, target, method)}
        region = info.focus()
        targets[target] = {"pooling": info.pooling, "truth": _pack_mask(info.truth, study.ras_plane, max_voxels),
                           "predicted": _pack_mask(info.predicted, study.ras_plane, max_voxels),
                           "focus": _focus(region, study.ras_plane, max_voxels)}
    if study.is_volume or study.ras_plane:
        spacing = [*study.spacing, 1.0][:3]
    else:
        spacing = [study.spacing[1], study.spacing[0], 1.0]
    focus = next((t["focus"] for t in targets.values() if t["focus"] is not None), None)
    if focus is None and focus_total is not None and focus_total.any():
        small, _ = downsample(focus_total, max_voxels)
        focus = [int(i) for i in np.unravel_index(int(np.argmax(small)), small.shape)]
    return {
        "name": study.name, "dims": dims, "spacing": [s * factor for s in spacing], "downsampled": factor,
        "channels": list(study.channels), "images": images, "overlays": overlays, "targets": targets,
        "focus": focus, "skipped": dict(study.skipped), "prediction": study.prediction,
        "prediction_table": prediction_table(study.prediction),
    }


def _lut() -> list[int]:
    cmap = matplotlib.colormaps[MAP_CMAP]
    rgb = (np.asarray(cmap(np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(int)
    return rgb.ravel().tolist()


def _asset(name: str) -> str:
    return resources.files("voxplain").joinpath("assets", "viewer", name).read_text(encoding="utf-8")


def _figure_html(title: str, png: bytes) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<div class="figure"><h3>{html.escape(title)}</h3>'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{b64}"></div>')


def _json_script(payload: Any) -> str:
    # Inside a script element, "</script" ends it and "<!--" switches the parser into a state in
    # which the viewer's own script would be swallowed: no "<" (nor ">", "&") may appear at all.
    # JSON's \u escapes read back as the same characters. U+2028/2029 are escaped for old parsers.
    text = json.dumps(payload, default=str)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def render_html(studies: Sequence[Study], figures: Sequence[tuple[str, bytes | str | os.PathLike]] = (),
                settings: dict[str, Any] | None = None, title: str = "voxplain report",
                max_voxels: int = DEFAULT_MAX_VOXELS, alerts: Sequence[str] = ()) -> str:
    """The report page as a string.

    Args:
        studies: the explained inputs shown in the viewer (one at a time, chosen from a list).
        figures: ``(title, PNG bytes or path)`` pairs shown below the viewer.
        settings: the run's settings shown as JSON (command line, seed, device...).
        max_voxels: the most voxels embedded per volume.
        alerts: warnings shown in red at the top of the page (e.g. a model with random weights).
    """
    if not studies:
        raise ValueError("a report needs at least one study")
    payload = {"studies": [_study_payload(s, max_voxels) for s in studies], "lut": _lut()}
    figs = []
    for fig_title, png in figures:
        if not isinstance(png, bytes):
            png = Path(png).read_bytes()
        figs.append(_figure_html(fig_title, png))
    per_study = {s.name: s.settings for s in studies}
    settings_json = json.dumps({"run": settings or {}, "studies": per_study}, indent=2, default=str)
    views = "".join(
        f'<div class="view" id="box-{v}"><canvas id="view-{v}" width="1" height="1"></canvas>'
        f'<input type="range" id="slice-{v}" min="0" max="0" value="0" aria-label="{v} slice">'
        f'<span class="caption">{v} <span id="pos-{v}"></span></span></div>'
        for v in ("axial", "coronal", "sagittal"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_asset("viewer.css")}</style>
</head><body>
<header><h1>{html.escape(title)}</h1>{"".join(f'<p class="alert" role="alert">{html.escape(a)}</p>' for a in alerts)}</header>
<main>
<section id="viewer"><h2>Viewer</h2>
<div class="controls">
<label>Input <select id="study"></select></label>
<label>Target <select id="target"></select></label>
<label>Method <select id="method"></select></label>
<label>Background <select id="channel"></select></label>
<label>Overlay opacity <input type="range" id="opacity" min="0" max="100" value="60"></label>
<label><input type="checkbox" id="show-truth" checked> <span class="swatch truth"></span>ground truth</label>
<label><input type="checkbox" id="show-predicted" checked> <span class="swatch predicted"></span>prediction</label>
</div>
<div class="colourbar" id="colourbar-box"><span>0</span><canvas id="colourbar" width="256" height="1"></canvas>
<span>1</span><span id="cb-label" class="caption"></span></div>
<div id="viewer-error" class="error"></div>
<p class="target-info" id="target-info"></p>
<div class="views">{views}</div>
<p class="caption" id="map-info"></p>
<ul class="notes" id="map-notes"></ul>
<p class="notes" id="skipped"></p>
<h3>Prediction</h3><div id="prediction"></div>
</section>
<section id="figures"><h2>Figures</h2>{"".join(figs) or "<p>No figures.</p>"}</section>
<section id="settings"><h2>Settings</h2>{settings_html(settings or {}, studies)}
<details><summary>All settings as JSON</summary><pre>{html.escape(settings_json)}</pre></details></section>
</main>
<script type="application/json" id="voxplain-data">{_json_script(payload)}</script>
<script>{_asset("viewer.js")}</script>
</body></html>
"""


def write_html(path: str | os.PathLike, studies: Sequence[Study], **kwargs) -> None:
    """Write :func:`render_html`'s page to ``path`` atomically."""
    page = render_html(studies, **kwargs)
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
