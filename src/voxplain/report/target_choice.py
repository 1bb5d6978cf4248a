"""From a command's ``--target`` and ``--region`` to the targets a report explains.

A segmentation channel is explained by its output averaged over a region
(:data:`~voxplain.report.regions.REGION_CHOICES`):

* ``predicted`` (default): the voxels the model predicts as that class, so the
  map explains the segmented object;
* ``all``: every voxel (NeuroXAI's global average pooling; on a small tumour it
  mostly explains the background);
* ``label``: the case's ground-truth segmentation of that class or BraTS region.

A target whose region is empty (the model predicts no ET voxels, or the ground
truth has none) is not explained: it is kept as *skipped*, with the reason, so
the report can say so instead of drawing an empty map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..targets import ClassTarget, SegmentationTarget, Target, predicted_region
from .regions import DEFAULT_REGION, REGION_CHOICES, channel_label_values, independent_channels, truth_mask

__all__ = ["TargetChoice", "choose_targets", "parse_targets", "channel_names"]


@dataclass
class TargetChoice:
    """One target of a report: what is explained and over which voxels.

    Attributes:
        label: the name shown (class or channel name, e.g. ``"WT"``).
        target: the target to explain (None when skipped).
        pooling: how the score is made, for people: e.g. ``"WT logit, mean over 812 predicted voxels"``.
        region: ``"predicted"``, ``"all"`` or ``"label"`` for segmentation, None for classification.
        predicted: the voxels the model predicts as this class (*spatial) bool on the model's grid
            (segmentation only).
        truth: the ground truth of this class/region on the model's grid, when the case has one
            (for a classifier: the case's tumour, all labels > 0).
        skipped: why the target is not explained (None when it is).
    """

    label: str
    target: Target | None
    pooling: str
    region: str | None = None
    predicted: np.ndarray | None = None
    truth: np.ndarray | None = None
    skipped: str | None = None

    @property
    def mask(self) -> np.ndarray | None:
        """The pooled voxels (None for whole-volume pooling and classifiers)."""
        return {"predicted": self.predicted, "label": self.truth}.get(self.region)

    @property
    def voxels(self) -> int | None:
        """How many voxels are pooled (None for whole-volume pooling and classifiers)."""
        return None if self.mask is None else int(np.count_nonzero(self.mask))

    def describe(self) -> dict:
        """JSON-friendly description for ``summary.json``."""
        out = {"pooling": self.pooling, "region": self.region, "voxels": self.voxels}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def channel_names(config: dict | None, task: str) -> list[str] | None:
    """Class names (classification) or output channel names (segmentation) from a checkpoint config."""
    names = (config or {}).get("class_names" if task == "classify" else "region_names")
    return [str(n) for n in names] if names else None


def _indices(spec: str, k: int, names: list[str] | None, task: str) -> list[int]:
    if spec == "all":
        return list(range(k))
    indices = []
    for item in (s.strip() for s in spec.split(",")):
        if names and item in names:
            indices.append(names.index(item))
        elif item.lstrip("-").isdigit():
            indices.append(int(item))
        else:
            known = f"; known names: {', '.join(names)}" if names else ""
            raise ValueError(f"--target {item!r} is not a class index{' or name' if names else ''}{known}")
    for i in indices:
        if not 0 <= i < k:
            raise IndexError(f"--target {i} is out of range: the model has {k} output "
                             f"{'class' if task == 'classify' else 'channel'}(s), valid 0..{k - 1}")
    return indices


def _check_task(task: str, output: torch.Tensor) -> None:
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    if task == "classify" and output.ndim != 2:
        raise ValueError(f"--task classify needs a model with a (B, K) output, this one gives "
                         f"{tuple(output.shape)}; use --task segment")
    if task == "segment" and output.ndim < 3:
        raise ValueError(f"--task segment needs a model with a (B, K, *spatial) output, this one gives "
                         f"{tuple(output.shape)}; use --task classify")


def choose_targets(task: str, spec: str | None, output: torch.Tensor, config: dict | None = None,
                   region: str | None = None, seg: np.ndarray | None = None,
                   case_name: str = "the case") -> list[TargetChoice]:
    """The targets of one case, explained or skipped.

    Args:
        task: ``"classify"`` or ``"segment"``.
        spec: comma-separated class/channel indices or names (from the checkpoint),
            ``"predicted"`` (classification default) or ``"all"`` (segmentation
            default: every output channel).
        output: the model's output on the case, (1, K) or (1, K, *spatial).
        config: the checkpoint's config (class/region names, output layout).
        region: segmentation pooling, one of ``predicted`` (default), ``all``, ``label``.
        seg: the case's ground-truth label map on the model's grid, if any.
    """
    config = config or {}
    _check_task(task, output)
    k = output.shape[1]
    names = channel_names(config, task)
    spec = (spec or ("predicted" if task == "classify" else "all")).strip()
    if task == "classify":
        # a classifier's decision has no region of its own; the tumour, when the case shows one, is the reference
        tumour = seg > 0 if seg is not None and np.any(seg > 0) else None
        if spec == "predicted":
            c = int(output[0].argmax())
            name = names[c] if names and c < len(names) else f"class {c}"
            return [TargetChoice(f"predicted {name}", ClassTarget(c), f"{name} logit (the predicted class)",
                                 truth=tumour)]
        out = []
        for i in _indices(spec, k, names, task):
            label = names[i] if names and i < len(names) else f"class {i}"
            out.append(TargetChoice(label, ClassTarget(i), f"{label} logit", truth=tumour))
        return out
    if spec == "predicted":
        raise ValueError("--target predicted is for classification; name segmentation channels or use 'all'")
    region = region or DEFAULT_REGION
    if region not in REGION_CHOICES:
        raise ValueError(f"--region must be one of {', '.join(REGION_CHOICES)}, got {region!r}")
    if region == "label" and seg is None:
        raise ValueError(f"--region label needs the case's ground-truth segmentation (a *_seg.nii.gz file in "
                         f"the case folder); {case_name} has none. Use --region predicted or all")
    spatial = tuple(output.shape[2:])
    if seg is not None and tuple(seg.shape) != spatial:
        if region == "label":
            raise ValueError(f"--region label: the ground truth of {case_name} has shape {tuple(seg.shape)} on the "
                             f"model's grid, the model's output {spatial}; they must match")
        seg = None
    activation = "sigmoid" if independent_channels(config) else "softmax"
    label_values = channel_label_values(config, k, names)
    out = []
    for i in _indices(spec, k, names, task):
        label = names[i] if names and i < len(names) else f"channel {i}"
        truth = None if seg is None else truth_mask(seg, label_values[i])
        predicted = predicted_region(output[:1], i, activation)[0].numpy()
        common = dict(region=region, predicted=predicted, truth=truth)
        if region == "all":
            n = int(np.prod(spatial))
            out.append(TargetChoice(label, SegmentationTarget(i, region=None, activation=activation),
                                    f"{label} logit, mean over all {n} voxels", **common))
            continue
        mask, where, empty = ((predicted, "predicted", f"model predicts no {label} voxels") if region == "predicted"
                              else (truth, "ground-truth", f"ground truth has no {label} voxels"))
        n = int(np.count_nonzero(mask))
        pooling = f"{label} logit, mean over {n} {where} voxels"
        if n == 0:
            out.append(TargetChoice(label, None, pooling, skipped=empty, **common))
            continue
        target = SegmentationTarget(i, region=torch.from_numpy(np.ascontiguousarray(mask)), activation=activation)
        out.append(TargetChoice(label, target, pooling, **common))
    return out


def parse_targets(task: str, spec: str | None, output: torch.Tensor, config: dict | None = None,
                  region: str | None = None, seg: np.ndarray | None = None) -> list[tuple[str, Target]]:
    """``(label, target)`` of every target :func:`choose_targets` explains (skipped ones left out)."""
    return [(c.label, c.target) for c in choose_targets(task, spec, output, config, region, seg)
            if c.target is not None]
