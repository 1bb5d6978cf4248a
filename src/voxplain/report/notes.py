"""What a reader must be told about a map: it is empty or constant, its method warned, it is incomplete.

A map that is all zero (or one value everywhere) carries no information; drawn
with a colour map it looks like "nothing is relevant", which is a finding it
does not support. Every figure, the viewer and ``summary.json`` therefore show
the notes made here next to the map.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .study import Study
from .volumes import as_numpy

__all__ = ["COMPLETENESS_LIMIT", "map_state", "map_notes", "completeness_of", "warnings_of"]

#: relative completeness error of an IG-type map above which the report flags it
COMPLETENESS_LIMIT = 0.05

_ZERO_REASONS = {
    "gradcam": "ReLU of the gradient-weighted feature maps is zero everywhere: no feature of the CAM layer "
               "supports the target",
    "guided_backprop": "the guided backward pass (negative gradients stopped at every guided activation) "
                       "let no gradient reach the input",
}


def map_state(attribution) -> str | None:
    """``"all zero"``, ``"constant (v)"`` or None for a map that varies."""
    a = as_numpy(attribution)
    if not np.any(a):
        return "all zero"
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo == hi:
        return f"constant ({lo:.3g})"
    return None


def _zero_reason(study: Study, target: str, method: str) -> str | None:
    maps = study.maps.get(target, {})
    if method == "guided_gradcam":
        for part, name in (("gradcam", "Grad-CAM"), ("guided_backprop", "guided backprop")):
            if part in maps and map_state(maps[part]) == "all zero":
                return f"it is guided backprop x Grad-CAM and its {name} factor is zero"
    return _ZERO_REASONS.get(method)


def warnings_of(extras: dict[str, Any] | None) -> list[str]:
    """A method's warnings from its ``Explanation.extras`` entry (empty when it has none)."""
    if not isinstance(extras, dict):
        return []
    return [str(w) for w in extras.get("warnings") or []]


def completeness_of(extras: dict[str, Any] | None, sample: int = 0) -> dict[str, float] | None:
    """One sample's completeness check from a method's extras: error, attribution sum, score difference."""
    if not isinstance(extras, dict) or not isinstance(extras.get("completeness"), dict):
        return None
    out = {}
    for key, values in extras["completeness"].items():
        try:
            out[key] = float(np.asarray(values, dtype=np.float64).reshape(-1)[sample])
        except (TypeError, ValueError, IndexError):
            continue
    return out if "error" in out else None


def map_notes(study: Study, target: str, method: str) -> list[str]:
    """Everything to show beside one map: empty/constant (with the reason when known), warnings, completeness."""
    notes = []
    m = study.maps.get(target, {}).get(method)
    state = None if m is None else map_state(m)
    if state is not None:
        reason = _zero_reason(study, target, method) if state == "all zero" else None
        notes.append(f"map is {state}" + (f": {reason}" if reason else ""))
    info = study.info(target)
    notes += info.warnings.get(method, [])
    check = info.completeness.get(method)
    said = any("completeness error" in note for note in notes)  # the method's own warning names the cause too
    if check is not None and not said and np.isfinite(check["error"]) and check["error"] > COMPLETENESS_LIMIT:
        notes.append(f"completeness error {check['error']:.1%} (> {COMPLETENESS_LIMIT:.0%}): the map sums to "
                     f"{check.get('attribution_sum', float('nan')):.3g}, F(x) - F(baseline) is "
                     f"{check.get('score_difference', float('nan')):.3g}")
    return notes
