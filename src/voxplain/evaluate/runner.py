"""Run every metric for every method over a set of cases.

:func:`evaluate_cases` explains each case with the chosen methods (one
:func:`voxplain.explain_detailed` call per case, so methods share passes) and
scores every map:

* faithfulness: deletion / insertion AUC (scores as probabilities);
* PIC: SIC (and AIC for classifiers), aggregated as the median curve over cases;
* localisation per ground-truth region (e.g. ``WT_relevance_mass``);
* complexity: sparseness, entropy;
* features: volume error, centroid distance and Dice of the thresholded map vs
  the whole tumour (region WT if given, else the last region);
* shortcut: share and enrichment of relevance on a marker mask, when a case has one;
* sanity checks on the first ``randomisation_cases`` cases: mean similarity to the
  trained model's map over the cascading randomisation (lower = passes) and, for
  classifiers, the random-logit similarity.

Values that a case cannot have (no region, healthy case, invalid PIC) are NaN
and left out of the per-method means (``nanmean``); the result keeps the count.
A case whose target pools over an empty region (e.g. the model predicts no
tumour) is not explained: its values are NaN and ``settings["skipped_cases"]``
says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..methods import create_methods
from ..run import open_run
from ..targets import (BratsRegionTarget, ClassTarget, EmptyRegionError, SegmentationTarget, Target, as_target,
                       freeze_region)
from .complexity import complexity_metrics
from .faithfulness import curves_on
from .features import feature_errors
from .localisation import localisation_metrics
from .pic import aggregate_pic, pic_metrics_on
from .randomisation import cascading_randomisation, random_logit
from .shortcut import marker_share

__all__ = ["EvalCase", "EvaluationResult", "evaluate_cases", "probability_target", "FAMILIES"]

#: metric families that :func:`evaluate_cases` can run
FAMILIES = ("faithfulness", "pic", "localisation", "complexity", "features", "shortcut", "randomisation")


@dataclass
class EvalCase:
    """One input to evaluate: ``image`` (C, *spatial), what to explain, and its ground truth.

    ``regions`` (R, *spatial) holds ground-truth masks named by ``region_names``
    (e.g. ET, TC, WT); ``marker`` (*spatial) a shortcut marker mask; ``spacing``
    the voxel size in mm (features in ml and mm).
    """

    name: str
    image: Tensor
    target: Any = None
    regions: Tensor | None = None
    region_names: Sequence[str] = ()
    marker: Tensor | np.ndarray | None = None
    spacing: Sequence[float] | None = None


@dataclass
class EvaluationResult:
    """Per-case values, per-method means and curves."""

    methods: list[str]
    cases: list[str]
    per_case: dict[str, dict[str, list[float]]]  # method -> metric -> one value per case
    curves: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> curve name -> x/y
    randomisation: dict[str, Any] = field(default_factory=dict)  # case name -> CascadingResult.as_dict()
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{method: {metric: mean over cases, NaN left out}}`` (NaN when no case has a value)."""
        out = {}
        for m, metrics in self.per_case.items():
            out[m] = {}
            for k, values in metrics.items():
                v = np.asarray(values, dtype=np.float64)
                out[m][k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """How many cases contributed a value to each mean."""
        return {m: {k: int(np.isfinite(np.asarray(v, dtype=np.float64)).sum()) for k, v in d.items()}
                for m, d in self.per_case.items()}

    def metric_names(self) -> list[str]:
        """Every metric seen, in first-seen order."""
        names: list[str] = []
        for d in self.per_case.values():
            names += [k for k in d if k not in names]
        return names


def probability_target(target: Target, output: Tensor) -> Target:
    """The same explained quantity as a probability, bound to the original decision.

    Deletion/insertion curves and SIC compare scores across very different inputs;
    probabilities keep them on one scale.
    """
    if isinstance(target, ClassTarget):
        classes = target.bind(output).classes
        return ClassTarget(classes, output="probability", activation=target.activation)
    if isinstance(target, BratsRegionTarget):
        return BratsRegionTarget(target.name, layout=target.layout, channels=target.channels,
                                 region=target.region, output="probability")
    if isinstance(target, SegmentationTarget):
        new = SegmentationTarget.__new__(SegmentationTarget)
        new.__dict__.update(target.__dict__)
        new.output = "probability"
        return new
    return target


def _append(store: dict, method: str, values: Mapping[str, float], index: int) -> None:
    """Record case ``index``'s values; metrics the earlier cases lacked are NaN there."""
    d = store.setdefault(method, {})
    for k, v in values.items():
        lst = d.setdefault(k, [])
        lst.extend([float("nan")] * (index - len(lst)))
        lst.append(float(v))


def evaluate_cases(model: nn.Module, cases: Iterable[EvalCase], methods: Sequence[str],
                   options: Mapping[str, Mapping[str, Any]] | None = None,
                   families: Sequence[str] = FAMILIES, steps: int = 20, baseline="zero",
                   pic_thresholds: Sequence[float] | None = None, tolerance: float = 0.0,
                   randomisation_cases: int = 1, seed: int = 0, device=None, batch_size: int | None = None,
                   memory_budget=None, progress: bool = False, sliding_window=None) -> EvaluationResult:
    """Explain and score every case; see the module docstring. ``cases`` may be a lazy iterable.

    ``sliding_window`` applies a patch-trained model window by window (as :func:`voxplain.explain`).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown metric famil(ies) {unknown}; choose from {FAMILIES}")
    methods = list(methods)
    per_case: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    curve_store: dict[str, dict[str, list]] = {m: {"deletion": [], "insertion": [], "sic": [], "aic": []}
                                               for m in methods}
    names: list[str] = []
    skipped: dict[str, str] = {}
    randomisation: dict[str, Any] = {}
    run_kw = dict(device=device, batch_size=batch_size, memory_budget=memory_budget, sliding_window=sliding_window)
    pic_kw = {} if pic_thresholds is None else {"thresholds": list(pic_thresholds)}
    method_objs = create_methods(methods, options)
    for case in cases:
        names.append(case.name)
        x = case.image[None].float()
        target = as_target(case.target)
        # one run per case: the explanations, then the metrics' probability scores on the same setup
        with contextlib.ExitStack() as stack:
            try:
                run = stack.enter_context(open_run(model, x, target, seed=seed, progress=progress, **run_kw))
            except EmptyRegionError as err:  # e.g. the model predicts none of the region's voxels
                skipped[case.name] = str(err)
                for m in methods:
                    _fill_missing(per_case, m, len(names))
                continue
            exp = run.explain(method_objs)
            prob_target = probability_target(target, exp.output)
            is_classifier = exp.output.ndim == 2
            regions = None if case.regions is None else torch.as_tensor(case.regions)[None]
            p = run.retarget(prob_target)
            for m in methods:
                amap = exp.maps[m]
                values: dict[str, float] = {}
                if "faithfulness" in families:
                    for mode in ("deletion", "insertion"):
                        c = curves_on(p, amap, mode, steps=steps, baseline=baseline, seed=seed)
                        values[f"{mode}_auc"] = c.auc[0]
                        curve_store[m][mode].append(c.scores[0])
                        curve_store[m].setdefault("fractions", c.fractions)
                if "pic" in families:
                    kinds = ("sic", "aic") if is_classifier else ("sic",)
                    pic = pic_metrics_on(p, amap, kinds, seed=seed, num_points=101, **pic_kw)
                    for kind in kinds:
                        values[f"{kind}_auc"] = pic[kind][0].auc
                        curve_store[m][kind].append(pic[kind][0])
                if "localisation" in families and regions is not None:
                    for j, rname in enumerate(case.region_names):
                        loc = localisation_metrics(amap, regions[:, j], tolerance)
                        values.update({f"{rname}_{k}": v[0] for k, v in loc.items()})
                if "features" in families and regions is not None:
                    whole = list(case.region_names).index("WT") if "WT" in case.region_names else -1
                    fe = feature_errors(amap, regions[:, whole], spacing=case.spacing)
                    values.update({"volume_error": fe["volume_error"][0],
                                   "centroid_distance": fe["centroid_distance"][0], "dice": fe["dice"][0]})
                if "complexity" in families:
                    values.update({k: v[0] for k, v in complexity_metrics(amap).items()})
                if "shortcut" in families and case.marker is not None:
                    ms = marker_share(amap, torch.as_tensor(np.asarray(case.marker))[None])
                    values.update({"marker_share": ms["share"][0], "marker_enrichment": ms["enrichment"][0]})
                _append(per_case, m, values, len(names) - 1)
        if "randomisation" in families and len(randomisation) < randomisation_cases:
            # the randomised models explain the trained model's predicted region, not their own
            res = cascading_randomisation(model, x, methods, freeze_region(target, exp.output), options, seed=seed,
                                          **run_kw)
            randomisation[case.name] = res.as_dict()
            for m in methods:
                vals = {f"randomisation_{k}": float(np.nanmean(v[1:])) if np.isfinite(v[1:]).any() else np.nan
                        for k, v in res.similarity[m].items() if k != "spearman_signed"}
                _append(per_case, m, vals, len(names) - 1)
            if is_classifier and exp.output.shape[1] > 1:
                rl = random_logit(model, x, methods, target, options, seed=seed, **run_kw)
                for m in methods:
                    _append(per_case, m, {"random_logit_spearman_abs": rl[m]["spearman_abs"][0],
                                         "random_logit_ssim": rl[m]["ssim"][0]}, len(names) - 1)
        for m in methods:
            _fill_missing(per_case, m, len(names))
    curves = _summarise_curves(curve_store)
    settings = {"steps": steps, "baseline": baseline if not isinstance(baseline, Tensor) else "tensor",
                "tolerance": tolerance, "seed": seed, "families": list(families),
                "randomisation_cases": randomisation_cases, "options": {k: dict(v) for k, v in (options or {}).items()},
                "skipped_cases": skipped}
    return EvaluationResult(methods, names, per_case, curves, randomisation, settings)


def _fill_missing(per_case: dict, method: str, n: int) -> None:
    """Pad every metric of ``method`` with NaN up to ``n`` cases (metrics a case could not have)."""
    for values in per_case[method].values():
        values.extend([float("nan")] * (n - len(values)))


def _summarise_curves(store: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for m, d in store.items():
        out[m] = {}
        fr = d.get("fractions")
        for mode in ("deletion", "insertion"):
            if d[mode]:
                ys = np.stack(d[mode])
                out[m][mode] = {"x": np.asarray(fr).tolist(), "y": ys.mean(0).tolist()}
        for kind in ("sic", "aic"):
            if d[kind]:
                agg = aggregate_pic(d[kind])
                out[m][kind] = {"x": agg.curve_x.tolist(), "y": agg.curve_y.tolist(), "auc": agg.auc,
                                "n_valid": agg.n_valid, "n_cases": agg.n_cases}
    return out
