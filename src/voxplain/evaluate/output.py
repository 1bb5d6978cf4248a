"""Write an :class:`~voxplain.evaluate.runner.EvaluationResult` to a folder.

Files (written atomically: the folder appears complete or not at all):

* ``metrics.json``: ``{method: {metric: mean over cases}}`` (NaN as ``null``);
* ``metrics_per_case.json``: ``{"cases": [...], "per_case": {method: {metric: [value per case]}},
  "counts": {method: {metric: cases with a value}}, "settings": {...}}``;
* ``metrics.csv``: one row per method, one column per metric (means);
* ``metrics_per_case.csv``: long format ``case, method, metric, value``;
* ``curves.json`` and ``curves.png``: mean deletion / insertion curves and median PIC curves;
* ``randomisation.json`` and ``randomisation.png``: cascading randomisation per case;
* ``report.html``: a self-contained page with the method x metric table and the plots.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from .runner import EvaluationResult

__all__ = ["write_evaluation", "METRIC_DIRECTIONS"]

#: how to read each metric: +1 higher is better, -1 lower is better (prefix match for region metrics)
METRIC_DIRECTIONS = {
    "deletion_auc": -1, "insertion_auc": 1, "sic_auc": 1, "aic_auc": 1,
    "pointing_game": 1, "relevance_mass": 1, "relevance_rank": 1, "roc_auc": 1,
    "sparseness": 1, "entropy": -1, "dice": 1, "centroid_distance": -1, "volume_error": 0,
    "marker_share": 0, "marker_enrichment": 0,
    "randomisation_spearman_abs": -1, "randomisation_ssim": -1,
    "random_logit_spearman_abs": -1, "random_logit_ssim": -1,
}


def _direction(metric: str) -> int:
    for key, d in METRIC_DIRECTIONS.items():
        if metric == key or metric.endswith("_" + key):
            return d
    return 0


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")


def _fmt(v: float) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _curves_figure(result: EvaluationResult) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = [k for k in ("deletion", "insertion", "sic", "aic")
             if any(k in c and c[k]["x"] for c in result.curves.values())]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    titles = {"deletion": "deletion (mean)", "insertion": "insertion (mean)", "sic": "SIC (median)",
              "aic": "AIC (median)"}
    for ax, kind in zip(axes[0], kinds):
        for m, curves in result.curves.items():
            if kind in curves and curves[kind]["x"]:
                ax.plot(curves[kind]["x"], curves[kind]["y"], label=m)
        ax.set_title(titles[kind])
        ax.set_xlabel("fraction of voxels" if kind in ("deletion", "insertion") else "information (normalised)")
        ax.set_ylabel("probability" if kind in ("deletion", "insertion") else "normalised prediction")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _randomisation_figure(result: EvaluationResult) -> bytes | None:
    if not result.randomisation:
        return None
    import matplotlib.pyplot as plt

    name, res = next(iter(result.randomisation.items()))
    measures = ("spearman_abs", "spearman_signed", "ssim")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), squeeze=False)
    stages = res["stages"]
    for ax, measure in zip(axes[0], measures):
        for m, sims in res["similarity"].items():
            y = np.nanmean(np.asarray(sims[measure], dtype=np.float64), axis=1)
            ax.plot(range(len(stages)), y, marker="o", label=m)
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, rotation=60, fontsize=7, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{measure} to the trained model's map")
        ax.grid(alpha=0.3)
    axes[0][0].set_xlabel(f"layers randomised, top down (case {name})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _html(result: EvaluationResult, summary, counts, figures: list[tuple[str, bytes]], title: str,
          failures: Sequence[tuple[str, str, str]] = ()) -> str:
    metrics = result.metric_names()
    head = "".join(f"<th>{html.escape(k)}<br><small>{'&uarr;' if _direction(k) > 0 else '&darr;' if _direction(k) < 0 else ''}"
                   f"</small></th>" for k in metrics)
    rows = []
    for m in result.methods:
        cells = []
        for k in metrics:
            v = summary[m].get(k, float("nan"))
            col = [summary[o].get(k, float("nan")) for o in result.methods]
            finite = [c for c in col if math.isfinite(c)]
            d = _direction(k)
            best = finite and d != 0 and math.isfinite(v) and v == (max(finite) if d > 0 else min(finite))
            n = counts[m].get(k, 0)
            cell = html.escape(_fmt(v))
            cells.append(f"<td title='{n} case(s)'{' class=best' if best else ''}>{cell}</td>")
        rows.append(f"<tr><th>{html.escape(m)}</th>{''.join(cells)}</tr>")
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,"
                   f"{base64.b64encode(png).decode('ascii')}'>" for t, png in figures)
    cases = ", ".join(html.escape(c) for c in result.cases)
    skipped = result.settings.get("skipped_cases") or {}
    skipped_note = ("<p class='note'>Not explained (no values): " + "; ".join(
        f"{html.escape(c)} ({html.escape(why)})" for c, why in skipped.items()) + "</p>") if skipped else ""
    failed = ""
    if failures:
        items = "".join(f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, _, reason in failures)
        failed = (f"<p class='failed'>{len(failures)} case(s) failed and are left out (see failures.csv):</p>"
                  f"<ul class='failed'>{items}</ul>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
thead th {{ background: #f0f0f0; vertical-align: bottom; }}
tbody th {{ text-align: left; background: #fafafa; }}
td.best {{ background: #d8f0d8; font-weight: bold; }}
img {{ max-width: 100%; }}
.note {{ color: #555; font-size: 13px; max-width: 60em; }}
.failed {{ color: #b00020; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Mean over {len(result.cases)} case(s) per method (NaN-free cases only; hover a cell for the
count). &uarr; higher is better, &darr; lower is better; the best method per column is green. For the
randomisation and random-logit columns lower similarity means the map depends on the model/class
(the sanity check is passed). Cases: {cases}.</p>
{failed}{skipped_note}
<div style="overflow-x:auto"><table><thead><tr><th>method</th>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
{imgs}
</body></html>
"""


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike, title: str = "voxplain evaluation",
                     overwrite: bool = True, failures: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write metrics, curves, plots and the HTML page to ``out_dir``; returns its path.

    ``failures``: ``(case, worker, reason)`` of cases left out because they failed (a run on a
    cluster), listed in the report.
    """
    summary, counts = result.summary(), result.counts()
    metrics = result.metric_names()
    curves_png = _curves_figure(result)
    rand_png = _randomisation_figure(result)
    with atomic_dir(out_dir, kind="evaluate", overwrite=overwrite) as tmp:
        _dump(tmp / "metrics.json", summary)
        _dump(tmp / "metrics_per_case.json", {"cases": result.cases, "per_case": result.per_case,
                                              "counts": counts, "settings": result.settings})
        with open(tmp / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method"] + metrics)
            for m in result.methods:
                w.writerow([m] + [_fmt(summary[m].get(k, float("nan"))) for k in metrics])
        with open(tmp / "metrics_per_case.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "method", "metric", "value"])
            for m in result.methods:
                for k, values in result.per_case[m].items():
                    for case, v in zip(result.cases, values):
                        w.writerow([case, m, k, _fmt(v)])
        _dump(tmp / "curves.json", result.curves)
        figures = []
        if curves_png:
            (tmp / "curves.png").write_bytes(curves_png)
            figures.append(("Faithfulness and information curves", curves_png))
        if result.randomisation:
            _dump(tmp / "randomisation.json", result.randomisation)
        if rand_png:
            (tmp / "randomisation.png").write_bytes(rand_png)
            figures.append(("Cascading randomisation", rand_png))
        (tmp / "report.html").write_text(_html(result, summary, counts, figures, title, failures))
    return Path(out_dir)
