"""The model's prediction beside the case's ground truth, as data for ``summary.json`` and a table for the report.

Classifiers: the predicted class and every class's probability, and the case's
label when known (a phantom's ``subjects.csv``, a label given with the case).
Segmentation models: per output channel (region) the predicted voxels and
volume, and with a ground-truth segmentation its voxels, volume and the Dice
overlap. Where model and ground truth disagree, a sentence says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .regions import compare_segmentation

__all__ = ["add_case_label", "add_segmentation_truth", "prediction_table", "prediction_line"]


def add_case_label(prediction: dict[str, Any], label: str | None) -> dict[str, Any]:
    """Record a classifier's case label (the truth) and whether the prediction agrees with it."""
    if label is None or "predicted_class" not in prediction:
        return prediction
    prediction["case_label"] = str(label)
    predicted = str(prediction.get("predicted_label", prediction["predicted_class"]))
    prediction["agrees_with_case_label"] = predicted == str(label)
    if predicted != str(label):
        prediction.setdefault("disagreements", []).append(f"model predicts {predicted}; case label {label}")
    return prediction


def add_segmentation_truth(prediction: dict[str, Any], predicted: dict[str, np.ndarray],
                           truth: dict[str, np.ndarray] | None, voxel_ml: float) -> dict[str, Any]:
    """Add per-region predicted/ground-truth voxels, volumes and Dice, and the disagreements, to ``prediction``."""
    rows, notes = compare_segmentation(predicted, truth, voxel_ml)
    prediction["regions"] = rows
    prediction["voxel_ml"] = round(voxel_ml, 6)
    if notes:
        prediction.setdefault("disagreements", []).extend(notes)
    return prediction


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _classification(p: dict[str, Any]) -> dict[str, Any]:
    probs = p.get("probabilities")
    logits = p.get("logits") or []
    names = list(probs) if isinstance(probs, dict) else [str(i) for i in range(len(probs or []))]
    values = list(probs.values()) if isinstance(probs, dict) else list(probs or [])
    predicted = str(p.get("predicted_label", p.get("predicted_class")))
    rows = []
    for i, (name, prob) in enumerate(zip(names, values)):
        marks = [m for m, on in (("predicted", name == predicted or str(i) == predicted),
                                 ("case label", name == p.get("case_label"))) if on]
        rows.append([name, _fmt(prob), _fmt(logits[i]) if i < len(logits) else "-", ", ".join(marks)])
    return {"columns": ["class", "probability", "logit", ""], "rows": rows}


def _segmentation(p: dict[str, Any]) -> dict[str, Any]:
    regions = p["regions"]
    with_truth = any("truth_voxels" in r for r in regions)
    columns = ["region", "predicted voxels", "predicted volume (ml)"]
    keys = ["region", "predicted_voxels", "predicted_ml"]
    if with_truth:
        columns += ["ground-truth voxels", "ground-truth volume (ml)", "Dice"]
        keys += ["truth_voxels", "truth_ml", "dice"]
    return {"columns": columns, "rows": [[_fmt(r.get(k)) for k in keys] for r in regions]}


def prediction_table(prediction: dict[str, Any]) -> dict[str, Any]:
    """``{"columns", "rows", "notes", "agree"}`` for the report's prediction table (strings only)."""
    p = prediction or {}
    if "probabilities" in p:
        table = _classification(p)
    elif "regions" in p:
        table = _segmentation(p)
    elif "voxels_per_channel" in p:
        table = {"columns": ["channel", "predicted voxels"],
                 "rows": [[str(k), _fmt(v)] for k, v in p["voxels_per_channel"].items()]}
    else:
        table = {"columns": ["", ""], "rows": [[str(k), _fmt(v) if not isinstance(v, (dict, list)) else
                                                 ", ".join(f"{a}: {_fmt(b)}" for a, b in v.items())
                                                 if isinstance(v, dict) else ", ".join(map(_fmt, v))]
                                                for k, v in p.items()]}
    notes = [str(n) for n in p.get("disagreements", [])]
    if p.get("agrees_with_case_label"):
        notes.append(f"the prediction agrees with the case label ({p.get('case_label')})")
    table["notes"] = notes
    table["disagree"] = bool(p.get("disagreements"))
    return table


def prediction_line(prediction: dict[str, Any]) -> str:
    """The prediction in one line, for an index of cases (e.g. ``"HGG (p 0.91); case label HGG"``)."""
    p = prediction or {}
    if "predicted_class" in p:
        name = str(p.get("predicted_label", p["predicted_class"]))
        probs = p.get("probabilities")
        prob = probs.get(name) if isinstance(probs, dict) else None
        line = name + (f" (p {prob:.2f})" if isinstance(prob, (int, float)) else "")
        if "case_label" in p:
            line += f"; case label {p['case_label']}"
        return line
    if "regions" in p:
        parts = []
        for r in p["regions"]:
            part = f"{r['region']} {r['predicted_voxels']} voxels"
            if r.get("dice") is not None:
                part += f" (Dice {r['dice']:.2f})"
            parts.append(part)
        return ", ".join(parts)
    if "voxels_per_channel" in p:
        return ", ".join(f"{k} {v} voxels" for k, v in p["voxels_per_channel"].items())
    return ""
