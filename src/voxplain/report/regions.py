"""Segmentation outputs as label maps and regions: what the model predicts, what the ground truth says.

Two output layouts are understood (as in :class:`voxplain.BratsRegionTarget`):

* independent sigmoid channels (the checkpoint's ``output`` says ``sigmoid``): a
  voxel belongs to a channel where its logit is positive. BraTS region channels
  (TC, WT, ET in any order) are combined into BraTS labels: 4 where ET, else 1
  where TC, else 2 where WT. Other independent channels: label ``i + 1`` of the
  last positive channel ``i``.
* softmax channels (mutually exclusive labels): the argmax channel's label value,
  channel ``k`` standing for ``config["label_values"][k]`` if the checkpoint has
  it, else the integer channel name, else BraTS's 0, 1, 2, 4 for four channels,
  else ``k``.

Ground-truth segmentations are BraTS label maps (0, 1, 2, 4), so the ground
truth of a channel is the set of label values it stands for (a single
foreground channel stands for every tumour label).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..targets import BRATS_LABELS

__all__ = ["REGION_CHOICES", "DEFAULT_REGION", "independent_channels", "channel_label_values",
           "predicted_label_map", "truth_mask", "region_centre", "dice", "compare_segmentation"]

#: what a segmentation target can pool over (CLI ``--region``)
REGION_CHOICES = ("predicted", "all", "label")
#: the CLI's and the reports' default: the voxels the model predicts as the class
DEFAULT_REGION = "predicted"


def independent_channels(config: dict | None) -> bool:
    """True when the checkpoint says its output channels are independent sigmoid regions."""
    return "sigmoid" in str((config or {}).get("output", ""))


def _is_brats_regions(names: Sequence[str] | None) -> bool:
    return bool(names) and sorted(str(n).upper() for n in names) == sorted(BRATS_LABELS)


def channel_label_values(config: dict | None, k: int, names: Sequence[str] | None = None) -> list[tuple[int, ...]]:
    """For each of the ``k`` output channels, the ground-truth label values it stands for."""
    config = config or {}
    if independent_channels(config) and _is_brats_regions(names) and len(names) == k:
        return [BRATS_LABELS[str(n).upper()] for n in names]
    values = config.get("label_values")
    if values is not None and len(values) == k:
        return [(int(v),) for v in values]
    if names and len(names) == k and all(str(n).lstrip("-").isdigit() for n in names):
        return [(int(n),) for n in names]
    if independent_channels(config) or k == 1:
        # one foreground channel: any tumour label; several: label i + 1, as predicted_label_map writes them
        return [(1, 2, 3, 4)] if k == 1 else [(i + 1,) for i in range(k)]
    if k == 4:
        return [(0,), (1,), (2,), (4,)]
    return [(i,) for i in range(k)]


def predicted_label_map(output, config: dict | None = None, names: Sequence[str] | None = None) -> np.ndarray:
    """The label map (*spatial) int16 of one sample's segmentation output (K, *spatial); see the module docstring."""
    out = torch.as_tensor(output).detach().float().cpu()
    k = out.shape[0]
    if independent_channels(config) or k == 1:
        positive = (out > 0).numpy()
        labels = np.zeros(out.shape[1:], dtype=np.int16)
        if k == len(names or ()) and _is_brats_regions(names):
            upper = [str(n).upper() for n in names]
            for region, value in (("WT", 2), ("TC", 1), ("ET", 4)):  # later regions take precedence
                labels[positive[upper.index(region)]] = value
            return labels
        for i in range(k):
            labels[positive[i]] = i + 1
        return labels
    values = np.array([v[0] for v in channel_label_values(config, k, names)], dtype=np.int16)
    return values[out.argmax(0).numpy()]


def truth_mask(seg: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Where a label map holds any of ``label_values``, as bool."""
    return np.isin(np.asarray(seg), list(label_values))


def region_centre(mask: np.ndarray | None) -> list[int] | None:
    """The voxel nearest the centre of mass of ``mask`` that lies inside it (None for an empty or no mask)."""
    if mask is None:
        return None
    where = np.argwhere(np.asarray(mask))
    if not len(where):
        return None
    centre = where.mean(axis=0)
    nearest = where[np.argmin(((where - centre) ** 2).sum(axis=1))]
    return [int(i) for i in nearest]


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice overlap of two masks; None when both are empty (nothing to compare)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def compare_segmentation(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray] | None,
                         voxel_ml: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Per region: predicted and ground-truth voxels and volumes, Dice; and sentences where they disagree.

    ``predicted`` and ``truth`` map a region name to its mask on the model's grid;
    ``voxel_ml`` is the volume of one voxel in millilitres.
    """
    rows, notes = [], []
    for name, mask in predicted.items():
        n = int(np.count_nonzero(mask))
        row: dict[str, Any] = {"region": name, "predicted_voxels": n, "predicted_ml": round(n * voxel_ml, 3)}
        if truth is not None and name in truth:
            t = int(np.count_nonzero(truth[name]))
            d = dice(mask, truth[name])
            row.update(truth_voxels=t, truth_ml=round(t * voxel_ml, 3), dice=None if d is None else round(d, 3))
            if n == 0 and t > 0:
                notes.append(f"no {name} predicted, ground truth has {t} {name} voxels")
            elif n > 0 and t == 0:
                notes.append(f"{n} {name} voxels predicted, ground truth has no {name}")
            elif d is not None and d < 0.5:
                notes.append(f"{name}: prediction and ground truth disagree (Dice {d:.2f})")
        rows.append(row)
    return rows, notes
