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

from ..layout import model_layout_only
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

__all__ = ["EvalCase", "EvaluationResult", "evaluate_cases", "probability_target", "FAMILIES", "CaseMetrics",
           "CaseRandomisation", "evaluate_case", "randomise_case", "MetricsAccumulator", "evaluation_settings",
           "check_families"]

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


@dataclass
class CaseMetrics:
    """One case's scores (:func:`evaluate_case`): what :class:`MetricsAccumulator` gathers into a result.

    ``values``: method -> metric -> value; ``curves``: method -> the pieces of the cohort's
    curves (``"deletion"``/``"insertion"`` scores, their ``"fractions"``, ``"sic"``/``"aic"``
    :class:`~voxplain.evaluate.pic.PicResult`); ``classes``: output channels (classifiers: classes).
    ``check_target``: what the sanity checks explain (a predicted region frozen to the trained
    model's mask); ``skipped``: why the case was not explained (an empty region), else None.
    """

    name: str
    values: dict[str, dict[str, float]]
    curves: dict[str, dict[str, Any]]
    is_classifier: bool
    classes: int
    check_target: Target | None = None
    skipped: str | None = None


@dataclass
class CaseRandomisation:
    """A case's sanity checks (:func:`randomise_case`): the cascading result and per-method values."""

    name: str
    result: dict[str, Any]  # CascadingResult.as_dict()
    values: dict[str, dict[str, float]]


@model_layout_only()  # metrics the same to the byte in one process or on a cluster
def evaluate_case(model: nn.Module, case: EvalCase, methods: Sequence[str],
                  options: Mapping[str, Mapping[str, Any]] | None = None, families: Sequence[str] = FAMILIES,
                  steps: int = 20, baseline="zero", pic_thresholds: Sequence[float] | None = None,
                  tolerance: float = 0.0, seed: int = 0, device=None, batch_size: int | None = None,
                  memory_budget=None, progress: bool = False, method_objs=None,
                  sliding_window=None) -> CaseMetrics:
    """Explain one case with every method and score every map (all families but randomisation).

    ``sliding_window`` applies a patch-trained model window by window (as :func:`voxplain.explain`).
    """
    run_kw = dict(device=device, batch_size=batch_size, memory_budget=memory_budget, sliding_window=sliding_window)
    pic_kw = {} if pic_thresholds is None else {"thresholds": list(pic_thresholds)}
    method_objs = method_objs if method_objs is not None else create_methods(methods, options)
    x = case.image[None].float()
    target = as_target(case.target)
    values: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, Any]] = {m: {} for m in methods}
    # one run per case: the explanations, then the metrics' probability scores on the same setup
    with contextlib.ExitStack() as stack:
        try:
            run = stack.enter_context(open_run(model, x, target, seed=seed, progress=progress, **run_kw))
        except EmptyRegionError as err:  # e.g. the model predicts none of the region's voxels
            return CaseMetrics(case.name, {m: {} for m in methods}, {m: {} for m in methods}, False, 0,
                               skipped=str(err))
        exp = run.explain(method_objs)
        prob_target = probability_target(target, exp.output)
        is_classifier = exp.output.ndim == 2
        regions = None if case.regions is None else torch.as_tensor(case.regions)[None]
        p = run.retarget(prob_target)
        for m in methods:
            amap = exp.maps[m]
            v: dict[str, float] = {}
            if "faithfulness" in families:
                for mode in ("deletion", "insertion"):
                    c = curves_on(p, amap, mode, steps=steps, baseline=baseline, seed=seed)
                    v[f"{mode}_auc"] = c.auc[0]
                    curves[m][mode] = c.scores[0]
                    curves[m]["fractions"] = c.fractions
            if "pic" in families:
                kinds = ("sic", "aic") if is_classifier else ("sic",)
                pic = pic_metrics_on(p, amap, kinds, seed=seed, num_points=101, **pic_kw)
                for kind in kinds:
                    v[f"{kind}_auc"] = pic[kind][0].auc
                    curves[m][kind] = pic[kind][0]
            if "localisation" in families and regions is not None:
                for j, rname in enumerate(case.region_names):
                    loc = localisation_metrics(amap, regions[:, j], tolerance)
                    v.update({f"{rname}_{k}": val[0] for k, val in loc.items()})
            if "features" in families and regions is not None:
                whole = list(case.region_names).index("WT") if "WT" in case.region_names else -1
                fe = feature_errors(amap, regions[:, whole], spacing=case.spacing)
                v.update({"volume_error": fe["volume_error"][0],
                          "centroid_distance": fe["centroid_distance"][0], "dice": fe["dice"][0]})
            if "complexity" in families:
                v.update({k: val[0] for k, val in complexity_metrics(amap).items()})
            if "shortcut" in families and case.marker is not None:
                ms = marker_share(amap, torch.as_tensor(np.asarray(case.marker))[None])
                v.update({"marker_share": ms["share"][0], "marker_enrichment": ms["enrichment"][0]})
            values[m] = {k: float(val) for k, val in v.items()}
    return CaseMetrics(case.name, values, curves, is_classifier, int(exp.output.shape[1]),
                       freeze_region(target, exp.output))


@model_layout_only()
def randomise_case(model: nn.Module, case: EvalCase, methods: Sequence[str],
                   options: Mapping[str, Mapping[str, Any]] | None = None, random_logits: bool = False,
                   seed: int = 0, device=None, batch_size: int | None = None, memory_budget=None,
                   check_target: Target | None = None, sliding_window=None) -> CaseRandomisation:
    """The sanity checks on one case: cascading model randomisation and, with ``random_logits``, the random-logit check.

    The randomised models explain the trained model's decision: ``check_target`` from
    :func:`evaluate_case` (a predicted region frozen to the trained model's mask); without
    it, the case's target is frozen here (one more forward). ``sliding_window`` as :func:`evaluate_case`.
    """
    run_kw = dict(device=device, batch_size=batch_size, memory_budget=memory_budget, sliding_window=sliding_window)
    x = case.image[None].float()
    target = as_target(case.target)
    if check_target is None:
        with open_run(model, x, target, seed=seed, **run_kw) as run:
            check_target = freeze_region(target, run.output)
    res = cascading_randomisation(model, x, methods, check_target, options, seed=seed, **run_kw)
    values: dict[str, dict[str, float]] = {}
    for m in methods:
        values[m] = {f"randomisation_{k}": float(np.nanmean(v[1:])) if np.isfinite(v[1:]).any() else np.nan
                     for k, v in res.similarity[m].items() if k != "spearman_signed"}
    if random_logits:
        rl = random_logit(model, x, methods, target, options, seed=seed, **run_kw)
        for m in methods:
            values[m].update({"random_logit_spearman_abs": float(rl[m]["spearman_abs"][0]),
                              "random_logit_ssim": float(rl[m]["ssim"][0])})
    return CaseRandomisation(case.name, res.as_dict(), values)


class MetricsAccumulator:
    """Gathers :class:`CaseMetrics` (and randomisation) case by case, in cohort order, into an :class:`EvaluationResult`.

    The one place that turns per-case scores into the result, whether the cases ran
    in this process or on a cluster (:mod:`voxplain.cohort`), so both give the same files.
    """

    def __init__(self, methods: Sequence[str]):
        self.methods = list(methods)
        self.per_case: dict[str, dict[str, list[float]]] = {m: {} for m in self.methods}
        self.curve_store: dict[str, dict[str, list]] = {m: {"deletion": [], "insertion": [], "sic": [], "aic": []}
                                                        for m in self.methods}
        self.names: list[str] = []
        self.randomisation: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    def add(self, case: CaseMetrics, randomisation: CaseRandomisation | None = None) -> None:
        """Add the next case's scores, and its sanity checks if it had them (a skipped case: NaN values)."""
        self.names.append(case.name)
        index = len(self.names) - 1
        if case.skipped is not None:
            self.skipped[case.name] = case.skipped
        for m in self.methods:
            for mode in ("deletion", "insertion", "sic", "aic"):
                if mode in case.curves[m]:
                    self.curve_store[m][mode].append(case.curves[m][mode])
            if "fractions" in case.curves[m]:
                self.curve_store[m].setdefault("fractions", case.curves[m]["fractions"])
            _append(self.per_case, m, case.values[m], index)
        if randomisation is not None:
            self.randomisation[randomisation.name] = randomisation.result
            for m in self.methods:
                _append(self.per_case, m, randomisation.values[m], index)
        for m in self.methods:
            _fill_missing(self.per_case, m, len(self.names))

    def result(self, settings: dict[str, Any]) -> EvaluationResult:
        """The result of every case added so far; ``settings`` gain ``skipped_cases``."""
        return EvaluationResult(self.methods, list(self.names), self.per_case, _summarise_curves(self.curve_store),
                                self.randomisation, dict(settings, skipped_cases=dict(self.skipped)))


def evaluation_settings(families: Sequence[str], steps: int, baseline, tolerance: float, seed: int,
                        randomisation_cases: int, options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The settings an :class:`EvaluationResult` records."""
    return {"steps": steps, "baseline": baseline if not isinstance(baseline, Tensor) else "tensor",
            "tolerance": tolerance, "seed": seed, "families": list(families),
            "randomisation_cases": randomisation_cases, "options": {k: dict(v) for k, v in (options or {}).items()}}


def evaluate_cases(model: nn.Module, cases: Iterable[EvalCase], methods: Sequence[str],
                   options: Mapping[str, Mapping[str, Any]] | None = None,
                   families: Sequence[str] = FAMILIES, steps: int = 20, baseline="zero",
                   pic_thresholds: Sequence[float] | None = None, tolerance: float = 0.0,
                   randomisation_cases: int = 1, seed: int = 0, device=None, batch_size: int | None = None,
                   memory_budget=None, progress: bool = False, sliding_window=None) -> EvaluationResult:
    """Explain and score every case; see the module docstring. ``cases`` may be a lazy iterable.

    ``sliding_window`` applies a patch-trained model window by window (as :func:`voxplain.explain`).
    """
    check_families(families)
    methods = list(methods)
    run_kw = dict(device=device, batch_size=batch_size, memory_budget=memory_budget, sliding_window=sliding_window)
    method_objs = create_methods(methods, options)
    acc = MetricsAccumulator(methods)
    for case in cases:
        scores = evaluate_case(model, case, methods, options, families, steps, baseline, pic_thresholds, tolerance,
                               seed, progress=progress, method_objs=method_objs, **run_kw)
        checks = None
        if scores.skipped is None and "randomisation" in families and len(acc.randomisation) < randomisation_cases:
            checks = randomise_case(model, case, methods, options, scores.is_classifier and scores.classes > 1,
                                    seed, check_target=scores.check_target, **run_kw)
        acc.add(scores, checks)
    return acc.result(evaluation_settings(families, steps, baseline, tolerance, seed, randomisation_cases, options))


def check_families(families: Sequence[str]) -> None:
    """Refuse metric family names :func:`evaluate_cases` does not know."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown metric famil(ies) {unknown}; choose from {FAMILIES}")


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
