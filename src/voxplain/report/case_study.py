"""Assemble what a report shows of one explained case: maps, targets, prediction vs ground truth.

Kept apart from running the model (:mod:`voxplain.report.pipeline`): given the
model's output, the chosen targets and their explanations, this builds the
:class:`~voxplain.report.study.Study` (with each target's pooling, regions,
method warnings and completeness checks, the targets skipped and why, and the
predicted label map) and the prediction summary with its ground-truth comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..targets import predicted_region
from .notes import completeness_of, warnings_of
from .prediction import add_case_label, add_segmentation_truth
from .regions import channel_label_values, independent_channels, predicted_label_map, truth_mask
from .study import Study, TargetInfo
from .summary import jsonable, methods_summary, prediction_summary
from .target_choice import TargetChoice, channel_names

__all__ = ["case_prediction", "target_info", "case_study"]


def case_prediction(output: torch.Tensor, config: dict, task: str, spacing: Sequence[float] | None = None,
                    seg: np.ndarray | None = None, case_label: str | None = None) -> dict[str, Any]:
    """The prediction summary of sample 0, compared with the case's ground truth when there is one.

    Classifiers: :func:`~voxplain.report.summary.prediction_summary` plus the case label.
    Segmentation: per channel the predicted (and ground-truth) voxels, volumes and Dice.
    """
    names = channel_names(config, task)
    independent = independent_channels(config)
    prediction = prediction_summary(output, 0, names, independent=independent)
    if task == "classify":
        return add_case_label(prediction, case_label)
    k = output.shape[1]
    names = names if names and len(names) == k else [str(i) for i in range(k)]
    activation = "sigmoid" if independent else "softmax"
    predicted = {n: predicted_region(output[:1], i, activation)[0].numpy() for i, n in enumerate(names)}
    truth = None
    if seg is not None and tuple(seg.shape) == tuple(output.shape[2:]):
        values = channel_label_values(config, k, names)
        truth = {n: truth_mask(seg, values[i]) for i, n in enumerate(names)}
    voxel_ml = math.prod(spacing) / 1000.0 if spacing else 0.001
    return add_segmentation_truth(prediction, predicted, truth, voxel_ml)


def target_info(choice: TargetChoice, explanation=None) -> TargetInfo:
    """A target's :class:`TargetInfo`: its pooling and regions, and its methods' warnings and completeness.

    Method extras are read as ``explanation.extras[method]["warnings"]`` (a list of
    strings) and ``["completeness"]`` (``error``, ``attribution_sum``,
    ``score_difference``, one value per sample); methods without them have none.
    """
    info = TargetInfo(choice.pooling, choice.predicted, choice.truth)
    if explanation is None:
        return info
    extras = getattr(explanation, "extras", None) or {}
    for method in explanation.maps:
        warnings = warnings_of(extras.get(method))
        if warnings:
            info.warnings[method] = warnings
        check = completeness_of(extras.get(method))
        if check is not None:
            info.completeness[method] = check
    return info


def case_study(name: str, image: np.ndarray, channels: Sequence[str], task: str, config: dict,
               output: torch.Tensor, choices: Sequence[TargetChoice], explanations: Mapping[str, Any],
               spacing: Sequence[float] | None = None, seg: np.ndarray | None = None,
               case_label: str | None = None, settings: dict[str, Any] | None = None) -> Study:
    """The study of one case.

    Args:
        name: the study's title.
        image: the model's input for the case (C, *spatial).
        channels: a name per input channel.
        task, config: ``"classify"`` or ``"segment"``, and the checkpoint's config.
        output: the model's output on the case (1, K) or (1, K, *spatial), CPU.
        choices: every target, explained or skipped (:func:`~voxplain.report.target_choice.choose_targets`).
        explanations: target label -> its :class:`~voxplain.Explanation` (skipped targets have none).
        spacing: voxel size in mm; seg: ground-truth labels on the model's grid; case_label: a
            classifier case's known class.
        settings: model, preprocessing... (the targets' entries are added here).
    """
    maps: dict[str, dict[str, Any]] = {}
    infos: dict[str, TargetInfo] = {}
    per_target: dict[str, Any] = {}
    for choice in choices:
        expl = explanations.get(choice.label)
        infos[choice.label] = target_info(choice, expl)
        entry: dict[str, Any] = choice.describe()
        if expl is not None:
            maps[choice.label] = {m: v[0].numpy() for m, v in expl.maps.items()}
            entry.update(target=jsonable(expl.target), explained_score=round(float(expl.scores[0]), 6),
                         methods=methods_summary(expl))
        per_target[choice.label] = entry
    prediction = case_prediction(output, config, task, spacing, seg, case_label)
    prediction["targets"] = {label: {k: v for k, v in entry.items() if k in ("pooling", "explained_score", "skipped")}
                             for label, entry in per_target.items()}
    labels = None
    if task == "segment" and output.ndim == 5:
        labels = predicted_label_map(output[0], config, channel_names(config, task))
    return Study(name, image, list(channels), maps, prediction=prediction,
                 settings={**(settings or {}), "targets": per_target}, spacing=spacing,
                 targets={c.label: infos[c.label] for c in choices if c.label in maps},
                 skipped={c.label: c.skipped for c in choices if c.skipped}, predicted_labels=labels)
