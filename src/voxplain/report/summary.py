"""``summary.json``: what was explained, what the model said, and how each map was made."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_file

__all__ = ["prediction_summary", "methods_summary", "study_summary", "write_json", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` with tensors, arrays, numpy scalars and non-finite floats made JSON-friendly."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist()) if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist()) if value.size <= 64 else f"array{value.shape}"
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def prediction_summary(output: torch.Tensor, sample: int = 0, class_names: list[str] | None = None,
                       score: float | None = None, target: dict | None = None,
                       independent: bool = False) -> dict[str, Any]:
    """The model's prediction for one sample of a (B, K) or (B, K, *spatial) output.

    Classification: predicted class, its name and softmax probabilities (sigmoid for K == 1).
    Segmentation: voxels per channel predicted positive: sigmoid > 0.5 if the channels
    are ``independent`` regions (or a single channel), else argmax counts.
    """
    out = output[sample].detach().float().cpu()
    summary: dict[str, Any] = {}
    if out.ndim == 1:
        probs = torch.sigmoid(out) if out.numel() == 1 else torch.softmax(out, 0)
        k = int(out.argmax()) if out.numel() > 1 else int(probs[0] > 0.5)
        summary["predicted_class"] = k
        if class_names and k < len(class_names):
            summary["predicted_label"] = class_names[k]
        names = class_names if class_names and len(class_names) == out.numel() else None
        summary["probabilities"] = ({n: round(float(p), 4) for n, p in zip(names, probs)} if names
                                    else [round(float(p), 4) for p in probs])
        summary["logits"] = [round(float(v), 4) for v in out]
    else:
        names = class_names if class_names and len(class_names) == out.shape[0] else \
            [str(i) for i in range(out.shape[0])]
        positive = (torch.sigmoid(out) > 0.5) if independent or len(names) == 1 else None
        if positive is None:
            labels = out.argmax(0)
            counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
        else:
            counts = {n: int(positive[i].sum()) for i, n in enumerate(names)}
        summary["voxels_per_channel"] = counts
    if score is not None:
        summary["explained_score"] = round(float(score), 6)
    if target is not None:
        summary["target"] = jsonable(target)
    return summary


def methods_summary(explanation) -> dict[str, Any]:
    """Per method: its options and run time in seconds, from an :class:`~voxplain.Explanation`;
    with ``steps="auto"``, also the step counts chosen (``steps_used``, per sample) and the gradient
    passes they took (``passes``: every step count tried)."""
    summary = {}
    for name in explanation.maps:
        entry = {"options": jsonable(explanation.options.get(name, {})),
                 "seconds": round(float(explanation.seconds.get(name, float("nan"))), 4)}
        used = (explanation.extras.get(name) or {}).get("steps_used")
        if used is not None:
            entry["steps_used"] = jsonable(used)
            passes = (explanation.extras.get(name) or {}).get("passes")
            if passes is not None:
                entry["passes"] = jsonable(passes)
        summary[name] = entry
    return summary


def study_summary(study) -> dict[str, Any]:
    """A study's entry of ``summary.json`` (without its files): prediction, settings, targets, map notes.

    ``targets`` holds, per explained target, how its score is pooled and, per method,
    the map's state (``"ok"``, ``"all zero"``, ``"constant (v)"``), the notes the report
    shows beside it and the completeness check of IG-type maps; ``skipped_targets``
    the targets not explained and why; ``layers`` the figure title and module path of each inspected layer.
    """
    from .notes import COMPLETENESS_LIMIT, map_notes, map_state

    targets: dict[str, Any] = {}
    for target, per_method in study.maps.items():
        info = study.info(target)
        maps = {}
        for method, m in per_method.items():
            item: dict[str, Any] = {"state": map_state(m) or "ok", "notes": map_notes(study, target, method)}
            check = info.completeness.get(method)
            if check is not None:
                item["completeness"] = {**{k: round(v, 6) for k, v in check.items()},
                                        "flagged": bool(check["error"] > COMPLETENESS_LIMIT)}
            maps[method] = item
        targets[target] = {"pooling": info.pooling, "maps": maps}
    entry: dict[str, Any] = {"name": study.name, "prediction": study.prediction, "settings": study.settings,
                             "targets": targets, "skipped_targets": dict(study.skipped), "maps": {}, "figures": []}
    if study.layers:
        entry["layers"] = [{"title": study.layer_labels.get(name, name), "module": name} for name in study.layers]
    return entry


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(jsonable(data), indent=2)
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
