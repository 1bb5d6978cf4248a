"""The report's settings section as readable tables: the run, then per input its targets and methods.

Every string is HTML-escaped here; the full settings stay available as JSON below the tables.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .study import Study

__all__ = ["settings_html"]


def _text(value: Any) -> str:
    """A compact, escaped rendering of a settings value (nested dicts as ``key = value`` lists)."""
    if isinstance(value, dict):
        if not value:
            return "-"
        return "; ".join(f"{html.escape(str(k))} = {_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if value else "-"
    if value is None:
        return "-"
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "settings") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _study_html(study: Study) -> str:
    s = study.settings or {}
    parts = [f"<h3>{html.escape(study.name)}</h3>"]
    layers = s.get("layers") or (s.get("inspection") or {}).get("layers")
    general = [(k, v) for k, v in s.items() if k not in ("targets", "layers")]
    if isinstance(s.get("inspection"), dict):  # its layer table is shown below, not as one long cell
        general = [(k, {a: b for a, b in v.items() if a != "layers"} if k == "inspection" else v)
                   for k, v in general]
    if general:
        parts.append(_table(["setting", "value"], [[html.escape(str(k)), _text(v)] for k, v in general]))
    targets = s.get("targets") or {}
    if targets:
        rows = [[html.escape(label), html.escape(study.info(label).pooling or "-"),
                 _text(t.get("explained_score")) if isinstance(t, dict) else "-"] for label, t in targets.items()]
        rows += [[html.escape(label), f"not explained: {html.escape(why)}", "-"] for label, why in study.skipped.items()
                 if label not in targets]
        parts.append(_table(["target", "explained score (how it is pooled)", "value on the input"], rows))
        methods: dict[str, dict] = {}
        for t in targets.values():
            if isinstance(t, dict):
                for m, d in (t.get("methods") or {}).items():
                    methods.setdefault(m, {"options": d.get("options"), "seconds": []})["seconds"].append(
                        d.get("seconds"))
        if methods:
            parts.append(_table(["method", "options", "seconds per target"],
                                [[html.escape(m.replace("_", " ")), _text(d["options"]), _text(d["seconds"])]
                                 for m, d in methods.items()]))
    if layers and all(isinstance(row, dict) for row in layers):
        parts.append(_table(["layer", "module", "output (C, *spatial)"],
                            [[html.escape(str(row.get("label", ""))), f"<code>{html.escape(str(row.get('module', '')))}"
                              "</code>", _text(row.get("output_shape"))] for row in layers]))
    return "".join(parts)


def settings_html(run: dict[str, Any], studies: Sequence[Study]) -> str:
    """The settings section's tables (the run's settings, then each study's)."""
    parts = []
    if run:
        parts.append(_table(["setting", "value"], [[html.escape(str(k)), _text(v)] for k, v in run.items()]))
    parts += [_study_html(s) for s in studies if s.settings]
    return "".join(parts) or "<p>No settings recorded.</p>"
