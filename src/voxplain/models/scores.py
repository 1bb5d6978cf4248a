"""Held-out scores of a trained model: what the README and a checkpoint's config report.

* classification: accuracy over all samples, per class, and the confusion matrix;
* region segmentation: Dice per region over the cases that have the region (the
  score that says how well a region is found), and, separately, the cases without
  it: how many of them the model also leaves empty (the BraTS convention would
  count those as Dice 1, which hides misses behind easy cases).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import REGIONS
from .training import dice_per_case, labels_to_region_channels

__all__ = ["heldout_scores"]


def _region_target(y: torch.Tensor, region_names: Sequence[str]) -> torch.Tensor:
    return y.float() if y.is_floating_point() else labels_to_region_channels(y.long(), region_names)


def heldout_scores(model: nn.Module, dataset: Dataset, task: str, region_names: Sequence[str] = REGIONS,
                   class_names: Sequence[str] | None = None, batch_size: int = 4, device=None) -> dict:
    """Scores of ``model`` (put in eval mode) on ``dataset`` of ``(image, target)`` items.

    ``task="classify"``: ``{"n", "accuracy", "per_class": {name: {"n", "accuracy"}},
    "confusion": rows = true class, columns = predicted}``.
    ``task="segment"`` (sigmoid region logits, a region predicted where the logit > 0):
    ``{"n", "dice": {region: {"cases", "mean", "min"}}, "empty": {region: {"cases",
    "predicted_empty", "mean_false_voxels"}}}``, the Dice over cases with the region and
    the empty-region cases apart.
    """
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            out = model(x.to(device, torch.float32)).cpu()
            if task == "classify":
                outputs.append(out.argmax(1))
                targets.append(torch.as_tensor(y).long().reshape(-1))
            else:
                target = _region_target(torch.as_tensor(y), region_names) > 0.5
                outputs.append(torch.stack([dice_per_case(out > 0, target),
                                            target.flatten(2).any(-1).float(),
                                            (out > 0).flatten(2).sum(-1).float()], dim=-1))
    if not outputs:
        raise ValueError("the held-out set is empty")
    if task == "classify":
        return _classification_scores(torch.cat(outputs), torch.cat(targets), class_names)
    return _segmentation_scores(torch.cat(outputs), region_names)


def _classification_scores(predicted: torch.Tensor, true: torch.Tensor, class_names) -> dict:
    k = int(max(int(predicted.max()), int(true.max())) + 1)
    if class_names:
        k = max(k, len(class_names))
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for t, p in zip(true.tolist(), predicted.tolist()):
        confusion[t, p] += 1
    per_class = {}
    for i, name in enumerate(names):
        n = int(confusion[i].sum())
        per_class[name] = {"n": n, "accuracy": float(confusion[i, i]) / n if n else None}
    return {"n": int(true.numel()), "accuracy": float((predicted == true).float().mean()),
            "per_class": per_class, "confusion": confusion.tolist()}


def _segmentation_scores(per_case: torch.Tensor, region_names: Sequence[str]) -> dict:
    # per_case: (N, R, 3) = Dice, region present, predicted voxels
    dice, present, predicted = per_case.unbind(-1)
    scores: dict = {"n": int(per_case.shape[0]), "dice": {}, "empty": {}}
    for r, name in enumerate(region_names):
        has = present[:, r] > 0
        d = dice[has, r]
        scores["dice"][name] = {"cases": int(has.sum()), "mean": float(d.mean()) if len(d) else None,
                                "min": float(d.min()) if len(d) else None}
        none = ~has
        false = predicted[none, r]
        scores["empty"][name] = {"cases": int(none.sum()), "predicted_empty": int((false == 0).sum()),
                                 "mean_false_voxels": float(false.mean()) if len(false) else None}
    return scores
