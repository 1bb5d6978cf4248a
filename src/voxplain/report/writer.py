"""Write a whole report folder: NIfTI maps, PNG figures, ``summary.json`` and ``report.html``."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_file
from ..data.nifti import save_nifti_like
from .figures import comparison_grid, inspection_grid, study_rows
from .html import DEFAULT_MAX_VOXELS, write_html
from .nifti_maps import map_filename, save_map_nifti
from .study import Study
from .summary import study_summary, write_json

__all__ = ["ScanSpace", "write_report", "write_index", "slug", "unique_slugs"]


@dataclass
class ScanSpace:
    """Where a study's maps go back to: the source scan's header and the way back from model input space.

    ``to_scan`` takes a map (C, *input spatial) and returns it on the scan's
    (RAS) voxel grid, e.g. undoing a crop or pad and a resampling (linear
    interpolation); ``None`` when the model saw the scan's grid as is.
    ``labels_to_scan`` does the same for a label map (*input spatial) and must not
    mix labels (nearest neighbour where it resamples); ``None`` uses ``to_scan``,
    which must then only crop and pad.
    """

    meta: Any
    to_scan: Callable[[np.ndarray], np.ndarray] | None = None
    labels_to_scan: Callable[[np.ndarray], np.ndarray] | None = None

    def map_on_scan(self, attribution: np.ndarray) -> np.ndarray:
        """A map (C, *input spatial) on the scan's grid."""
        return self.to_scan(attribution) if self.to_scan is not None else attribution

    def labels_on_scan(self, labels: np.ndarray) -> np.ndarray:
        """A label map (*input spatial) on the scan's grid, labels kept as they are."""
        back = self.labels_to_scan or self.to_scan
        return np.rint(back(labels)).astype(np.int16) if back is not None else labels.astype(np.int16)


def slug(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("_").lower() or "study"


def unique_slugs(names: Sequence[str]) -> list[str]:
    """:func:`slug` of each name, made unique (names such as "Case 1" and "case_1" share a slug):
    a repeat gets ``-2``, ``-3``... in the order given."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = candidate = slug(name)
        n = 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def write_report(folder: str | os.PathLike, studies: Sequence[Study], settings: dict[str, Any] | None = None,
                 scans: dict[str, ScanSpace] | None = None, title: str = "voxplain report",
                 figures: Sequence[tuple[str, str]] = (), max_voxels: int = DEFAULT_MAX_VOXELS,
                 alerts: Sequence[str] = ()) -> dict:
    """Write the report of ``studies`` into ``folder``; returns the summary written to ``summary.json``.

    Args:
        folder: output folder (created if needed; callers wrap it in :func:`voxplain.atomic.atomic_dir`).
        studies: explained inputs, each with its maps per target and method.
        settings: the run's settings (command, seed, device...).
        scans: study name -> :class:`ScanSpace` for studies whose maps are written as NIfTI.
        figures: extra ``(title, path relative to folder)`` PNGs already written (e.g. filter grids).
        alerts: warnings shown in red at the top of the report and listed in ``summary.json``
            (e.g. a model with random weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scans = scans or {}
    names = [s.name for s in studies]
    if len(set(names)) != len(names):
        raise ValueError(f"study names must be unique, got {names}")
    shown: list[tuple[str, str]] = []
    summary_studies = []
    for study in studies:
        sub = slug(study.name) if len(studies) > 1 else ""
        entry = study_summary(study)
        scan = scans.get(study.name)
        if scan is not None:
            for target, per_method in study.maps.items():
                for method, m in per_method.items():
                    rel = Path("maps", sub, map_filename(target, method))
                    save_map_nifti(scan.map_on_scan(m), scan.meta, folder / rel)
                    entry["maps"].setdefault(target, {})[method] = rel.as_posix()
            if study.predicted_labels is not None and study.is_volume:
                rel = Path(f"prediction_{sub}.nii.gz" if sub else "prediction.nii.gz")
                save_nifti_like(scan.labels_on_scan(np.asarray(study.predicted_labels)), scan.meta, folder / rel,
                                dtype=np.int16)
                entry["prediction_map"] = rel.as_posix()
        skipped = [f"{t} not explained: {why}" for t, why in study.skipped.items()]
        if study.maps:
            rel = f"figures/comparison_{slug(study.name)}.png"
            comparison_grid(folder / rel, study_rows(study), title=study.name, notes=skipped)
            shown.append((f"Method comparison: {study.name}", rel))
            entry["figures"].append(rel)
        if study.layers:
            rel = f"figures/inspection_{slug(study.name)}.png"
            target = study.settings.get("inspection", {}).get("target") or next(iter(study.maps), None)
            info = study.info(target) if target is not None else None
            inspection_grid(folder / rel, study.image, study.layers, labels=study.layer_labels,
                            title=f"Grad-CAM layer by layer: {study.name}" + (f" ({info.pooling})" if info and
                                                                               info.pooling else ""),
                            ras_plane=study.ras_plane, truth=info.truth if info else None,
                            predicted=info.predicted if info else None)
            shown.append((f"Network inspection: {study.name}", rel))
            entry["figures"].append(rel)
        summary_studies.append(entry)
    shown += list(figures)
    summary = {"title": title, "settings": settings or {}, "studies": summary_studies,
               "figures": [rel for _, rel in shown], "report": "report.html"}
    if alerts:
        summary["alerts"] = list(alerts)
    write_json(folder / "summary.json", summary)
    write_html(folder / "report.html", studies, figures=[(t, folder / rel) for t, rel in shown],
               settings=settings, title=title, max_voxels=max_voxels, alerts=alerts)
    return summary


def write_index(path: str | os.PathLike, entries: Sequence[tuple[str, str, str]],
                title: str = "voxplain reports", figure: str | None = None) -> None:
    """A plain index page linking one report per case: ``(case name, relative link, one-line prediction)``,
    with an optional figure (a path relative to the page) below the table."""
    rows = "".join(f'<tr><td><a href="{html.escape(link)}">{html.escape(name)}</a></td>'
                   f"<td>{html.escape(pred)}</td></tr>" for name, link, pred in entries)
    shown = f'<p><img alt="comparison" style="max-width:100%" src="{html.escape(figure)}"></p>' if figure else ""

    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:system-ui,sans-serif;margin:20px}td,th{border:1px solid #ddd;"
            "padding:4px 8px}table{border-collapse:collapse}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table><tr><th>case</th><th>prediction</th></tr>{rows}</table>{shown}"
            "</body></html>\n")
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
