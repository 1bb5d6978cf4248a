"""A cohort's ``index.html``: every case with its status (done or failed, and why), prediction and worker."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..atomic import atomic_file

__all__ = ["CaseRow", "write_cohort_index", "FIGURES_SHOWN"]

#: cases whose comparison figure the index shows below the table
FIGURES_SHOWN = 8


@dataclass
class CaseRow:
    """One case of the index: ``link`` and ``figure`` are relative to the index (empty when there is none)."""

    name: str
    status: str  # "done" or "failed"
    prediction: str = ""
    worker: str = ""
    reason: str = ""
    link: str = ""
    figure: str = ""


def write_cohort_index(path: str | os.PathLike, rows: Sequence[CaseRow], title: str) -> None:
    """Write the index page: a summary line, one table row per case, the first cases' comparison figures."""
    failed = sum(r.status != "done" for r in rows)
    body = []
    for r in rows:
        name = (f'<a href="{html.escape(r.link)}">{html.escape(r.name)}</a>' if r.link and r.status == "done"
                else html.escape(r.name))
        status = "done" if r.status == "done" else f'<span class="failed">failed</span>: {html.escape(r.reason)}'
        body.append(f"<tr><td>{name}</td><td>{status}</td><td>{html.escape(r.prediction)}</td>"
                    f"<td>{html.escape(r.worker)}</td></tr>")
    shown = [r for r in rows if r.status == "done" and r.figure][:FIGURES_SHOWN]
    figures = "".join(f'<h2>{html.escape(r.name)}</h2><p><img alt="{html.escape(r.name)}" '
                      f'style="max-width:100%" src="{html.escape(r.figure)}"></p>' for r in shown)
    summary = (f"{len(rows) - failed} of {len(rows)} cases done"
               + (f", <span class=\"failed\">{failed} failed</span> (see failures.csv)" if failed else ""))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:system-ui,sans-serif;margin:20px}td,th{border:1px solid #ddd;"
            "padding:4px 8px;text-align:left}table{border-collapse:collapse}.failed{color:#b00020;"
            "font-weight:bold}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{summary}</p>"
            "<table><tr><th>case</th><th>status</th><th>prediction</th><th>worker</th></tr>"
            f"{''.join(body)}</table>{figures}</body></html>\n")
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
