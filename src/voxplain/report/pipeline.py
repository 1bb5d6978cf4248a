"""From a model and an input on disk to a report folder: what ``voxplain explain`` and ``inspect`` do.

Each step is a small function: load the model (and its checkpoint config or
MONAI bundle), prepare a case for the model (channels, voxel grid, normalisation,
size: :mod:`voxplain.report.preparation`, remembering how to undo it), turn the
command's target spec into targets, explain, and write the report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_dir, check_replaceable
from ..run import Run, open_run
from ..targets import SegmentationTarget, Target
from .inputs import Case, load_cases
from .figures import comparison_grid, study_rows
from .preparation import ModelGrid, Prepared, model_grid, prepare_case
from .study import Study
from .case_study import case_prediction, case_study, target_info
from .prediction import prediction_line
from .layer_labels import short_layer_labels
from .regions import DEFAULT_REGION
from .summary import jsonable
from .target_choice import TargetChoice, channel_names, choose_targets, parse_targets
from .writer import ScanSpace, slug, unique_slugs, write_index, write_report

__all__ = ["LoadedModel", "load_model_spec", "check_output_folder", "prepare_case", "Prepared", "parse_targets",
           "open_case", "explain_case", "inspect_case", "run_explain", "run_inspect", "explain_settings",
           "report_case", "model_alerts", "ModelGrid", "model_grid"]


@dataclass
class LoadedModel:
    """A model and what its checkpoint says about it (empty for other model kinds).

    ``output_key``: for a model returning a tuple, list or dict, which output to explain.
    ``bundle``: the :class:`~voxplain.models.bundle.BundleDescription` of a MONAI bundle
    (its channel/class names and activation are also in ``config``, in a checkpoint's
    terms). ``random_weights``: the model's weights are its random initialisation.
    """

    model: nn.Module
    config: dict = field(default_factory=dict)
    spec: str = ""
    output_key: Any = None
    bundle: Any = None
    random_weights: bool = False


def load_model_spec(spec: str, weights: str | None = None, allow_unsafe_pickle: bool = False,
                    random_weights: bool = False) -> LoadedModel:
    """Load ``spec`` (checkpoint folder, shipped model name, MONAI bundle folder, ``module:factory`` + weights,
    TorchScript file).

    ``spec`` is what a user typed: a bundle, like ``module:factory`` and TorchScript, is
    code that runs when loaded (a path read from a file or database is never loaded here).
    ``random_weights`` allows ``module:factory`` without weights.
    """
    from ..models.bundle import is_bundle_folder, load_bundle
    from ..models.checkpoint import is_checkpoint_path, load_checkpoint, load_model, resolve_model_spec

    path = resolve_model_spec(spec)
    if is_bundle_folder(path):
        bundle = load_bundle(path, weights)
        return LoadedModel(bundle.network, _bundle_config(bundle), str(spec), bundle=bundle)
    if is_checkpoint_path(path):
        model, config = load_checkpoint(path, weights)
        return LoadedModel(model, config, str(spec))
    model = load_model(spec, weights, allow_unsafe_pickle=allow_unsafe_pickle, random_weights=random_weights)
    return LoadedModel(model, {}, str(spec), random_weights=weights is None and ":" in str(spec) and random_weights)


def _bundle_config(bundle) -> dict:
    """What a bundle says, in a voxplain checkpoint's ``config.json`` terms (task, names, output activation)."""
    config: dict[str, Any] = {"task": "segment", "model": f"MONAI bundle {bundle.name or bundle.path.name}"}
    if bundle.class_names:
        config["region_names"] = list(bundle.class_names)
    if bundle.channel_names:
        config["channel_names"] = list(bundle.channel_names)
    if bundle.output_activation:
        config["output"] = f"{bundle.output_activation} (bundle postprocessing)"
    return config


#: cases shown in the comparison grid of a folder of cases (one row each)
MAX_CASE_ROWS = 8


@contextlib.contextmanager
def open_case(loaded: LoadedModel, x: torch.Tensor, task: str, target_spec: str | None, device=None,
              region: str | None = None, seg: np.ndarray | None = None, case_name: str = "the case",
              **kwargs) -> Iterator[tuple[Run, list[TargetChoice]]]:
    """:func:`~voxplain.run.open_run` on a prepared case, its targets chosen from the model's output.

    Yields the run and every target of the command's spec, explained or skipped
    (:func:`~voxplain.report.target_choice.choose_targets`; ``region`` and the case's
    ground truth ``seg`` on the model's grid choose the segmentation pooling). The run
    is bound to the first explainable target; explain the others with
    ``run.retarget(choice.target)``. When every target is skipped the run is bound to
    the first channel pooled over all voxels, only so that it can be opened: nothing
    should be explained then. ``kwargs`` as for ``open_run``.
    """
    choices: list[TargetChoice] = []

    def first_target(output: torch.Tensor) -> Target:
        choices.extend(choose_targets(task, target_spec, output.cpu(), loaded.config, region, seg, case_name))
        explainable = [c.target for c in choices if c.target is not None]
        return explainable[0] if explainable else SegmentationTarget(0, region=None)

    with open_run(loaded.model, x, first_target, device=device, output_key=loaded.output_key, **kwargs) as run:
        yield run, choices


def explain_case(loaded: LoadedModel, case: Case, task: str, target_spec: str | None, methods: Sequence[str],
                 options: dict | None = None, device=None, seed: int = 0, progress: bool = False,
                 batch_size: int | None = None, memory_budget: str | None = None, region: str | None = None,
                 normalise: bool = True, name: str | None = None, size: Sequence[int] | None = None,
                 centre: Sequence[float] | None = None, grid: ModelGrid | None = None, fold_batchnorm: bool = False
                 ) -> tuple[Study, ScanSpace | None]:
    """Explain one case with every method for every target; returns the study and where its maps go.

    Segmentation targets pool their channel over ``region`` (default: the predicted
    voxels; see :mod:`voxplain.report.target_choice`); a target with an empty region
    is skipped and the study says why. All targets share one run (one first forward).
    ``grid``: what the model expects of the scan (default: from the checkpoint or bundle).
    ``fold_batchnorm``: as for :func:`voxplain.explain`.
    """
    from ..methods import create_methods

    grid = grid if grid is not None else model_grid(loaded.config, loaded.bundle)
    prepared = prepare_case(case, loaded.model, loaded.config, normalise, size, centre, grid)
    method_objs = create_methods(methods, options)
    explanations = {}
    with open_case(loaded, prepared.x, task, target_spec, device, region, prepared.seg, case.name,
                   methods=method_objs, seed=seed, progress=progress, batch_size=batch_size,
                   memory_budget=memory_budget, sliding_window=grid.sliding_window,
                   fold_batchnorm=fold_batchnorm) as (first, choices):
        output = first.output.cpu()
        explainable = [c for c in choices if c.target is not None]
        for i, choice in enumerate(explainable):
            explanations[choice.label] = (first if i == 0 else first.retarget(choice.target)).explain(method_objs)
    model_info = {k: loaded.config[k] for k in ("model", "model_config", "task") if k in loaded.config}
    settings = {"model": loaded.spec, "model_config": jsonable(model_info), "task": task,
                "region": region or DEFAULT_REGION if task == "segment" else None, "preprocessing": prepared.notes}
    study = case_study(name or case.name, prepared.x[0].numpy(), _channels(case, prepared), task, loaded.config, output,
                       choices, explanations, prepared.spacing or case.spacing, prepared.seg,
                       case.label_among(channel_names(loaded.config, task)), settings)
    return study, _scan_space(case, prepared)


def _channels(case: Case, prepared: Prepared) -> list[str]:
    """The channel names in the order the model sees them."""
    order = prepared.notes.get("channels", {}).get("from_scan")
    return list(order) if order else list(case.channels)


def _scan_space(case: Case, prepared: Prepared) -> ScanSpace | None:
    if case.meta is None:
        return None
    return ScanSpace(case.meta, prepared.to_scan, prepared.labels_to_scan)


def _model_settings(loaded: LoadedModel, grid: ModelGrid) -> dict[str, Any]:
    """What summary.json records of the model beyond the command: random weights, bundle, its grid."""
    out: dict[str, Any] = {"random_weights": loaded.random_weights}
    if loaded.bundle is not None:
        b = loaded.bundle
        out["bundle"] = {"name": b.name, "version": b.version, "channels": b.channel_names, "classes": b.class_names,
                         "output_activation": b.output_activation,
                         "preprocessing": [step.name for step in b.preprocessing]}
    out["model_grid"] = {"spacing_mm": grid.spacing, "orientation": grid.orientation,
                         "pad_multiple": grid.pad_multiple,
                         "sliding_window": grid.sliding_window.settings() if grid.sliding_window else None,
                         "from": dict(grid.source)}
    return jsonable(out)


def model_alerts(loaded: LoadedModel) -> list[str]:
    """Warnings the report shows in red at the top (e.g. an untrained model)."""
    if loaded.random_weights:
        return [f"The model {loaded.spec} has RANDOM WEIGHTS (--random-weights, no --weights file): these maps "
                "explain an untrained network, not a trained model."]
    return []


def check_output_folder(out: str | os.PathLike, kind: str = "explain") -> Path:
    """``out`` as a path, refusing (early, before any work) what :func:`voxplain.atomic.check_replaceable` refuses.

    The output folder is replaced as a whole once the new one is complete, so only an
    empty folder or an earlier output of the same ``kind`` that holds nothing else is taken.
    """
    return check_replaceable(out, kind)


def explain_settings(model: str, inputs: Sequence[str], task: str, target: str | None, methods: Sequence[str],
                     weights: str | None = None, options: dict | None = None, device=None, seed: int = 0,
                     command: str = "", output_key=None, region: str | None = None,
                     loaded: LoadedModel | None = None, grid: ModelGrid | None = None,
                     fold_batchnorm: bool = False) -> dict[str, Any]:
    """The run's settings as every case's ``summary.json`` records them (``voxplain explain``, any engine).

    With the ``loaded`` model and its ``grid``, also what they say beyond the command
    (random weights, the bundle, the model's grid and where each setting came from).
    """
    settings = {"command": command, "model": model, "weights": weights, "inputs": [str(i) for i in inputs],
                "task": task, "target": target, "region": region or DEFAULT_REGION if task == "segment" else None,
                "methods": list(methods), "options": options or {}, "seed": seed,
                "device": str(device or "model's device"), "fold_batchnorm": fold_batchnorm}
    if loaded is not None:
        settings.update(_model_settings(loaded, grid if grid is not None else model_grid(loaded.config,
                                                                                         loaded.bundle)))
    if output_key is not None:
        settings["output_key"] = output_key
    return settings


def report_case(folder: str | os.PathLike, loaded: LoadedModel, case: Case, task: str, target: str | None,
                methods: Sequence[str], settings: dict[str, Any], options: dict | None = None, device=None,
                seed: int = 0, progress: bool = False, batch_size: int | None = None,
                memory_budget: str | None = None, region: str | None = None,
                grid: ModelGrid | None = None, fold_batchnorm: bool = False) -> Study:
    """Explain one case and write its report into ``folder``; returns the study.

    The one per-case step of ``voxplain explain``, whether the cases run one after
    another in this process or as tasks on a Dask cluster (:mod:`voxplain.cohort`).
    ``grid``: what the model expects of the scan (default: from the checkpoint or bundle).
    """
    study, scan = explain_case(loaded, case, task, target, methods, options, device, seed, progress,
                               batch_size, memory_budget, region, grid=grid, fold_batchnorm=fold_batchnorm)
    write_report(folder, [study], settings=settings, scans={study.name: scan} if scan else None,
                 title=f"voxplain: {case.name}", alerts=model_alerts(loaded))
    return study


def run_explain(model: str, inputs: Sequence[str], out: str | os.PathLike, task: str, target: str | None,
                methods: Sequence[str], weights: str | None = None, options: dict | None = None, device=None,
                seed: int = 0, progress: bool = False, batch_size: int | None = None,
                memory_budget: str | None = None, region: str | None = None, allow_unsafe_pickle: bool = False,
                channels: int | None = None, command: str = "", output_key=None,
                channels_from_4d: bool = False, spacing=None, pad_multiple=None, sliding_window=None,
                random_weights: bool = False, fold_batchnorm: bool = False) -> Path:
    """``voxplain explain``: one report folder, or one per case plus ``index.html`` for a folder of cases.

    ``spacing`` (mm), ``pad_multiple`` and ``sliding_window`` override what the checkpoint or
    bundle says (:func:`~voxplain.report.preparation.model_grid`); ``random_weights`` allows a
    ``module:factory`` model without weights (the report then says so in red);
    ``fold_batchnorm``: as for :func:`voxplain.explain` (recorded in the settings).
    The cases run one after another in this process and the whole folder appears when
    complete; :func:`voxplain.cohort.run_explain_cohort` runs them on a Dask cluster instead.
    """
    from ..methods import create_method

    out = check_output_folder(out, "explain")
    for m in methods:  # fail on a bad method name before loading anything large
        create_method(m, (options or {}).get(m))
    loaded = load_model_spec(model, weights, allow_unsafe_pickle, random_weights)
    loaded.output_key = output_key
    grid = model_grid(loaded.config, loaded.bundle, spacing, pad_multiple, sliding_window)
    cases = load_cases(inputs, channels, channels_from_4d)
    settings = explain_settings(model, inputs, task, target, methods, weights, options, device, seed, command,
                                output_key, region, loaded, grid, fold_batchnorm)
    folders = unique_slugs([case.name for case in cases])
    with atomic_dir(out, kind="explain") as tmp:
        entries, rows, skipped = [], [], []
        for case, sub in zip(cases, folders):
            folder = tmp / sub if len(cases) > 1 else tmp
            study = report_case(folder, loaded, case, task, target, methods, settings, options, device, seed,
                                progress, batch_size, memory_budget, region, grid, fold_batchnorm)
            entries.append((case.name, f"{folder.relative_to(tmp).as_posix()}/report.html" if len(cases) > 1
                            else "report.html", prediction_line(study.prediction)))
            case_rows = study_rows(study)
            if case_rows and len(rows) < MAX_CASE_ROWS:  # the first target of each case, a row per case
                case_rows[0].label = f"{case.name}\n{case_rows[0].label}"
                rows.append(case_rows[0])
            elif not case_rows:
                skipped.append(f"{case.name}: " + "; ".join(f"{t} not explained ({why})"
                                                              for t, why in study.skipped.items()))
        if len(cases) > 1:
            figure = None
            if rows:
                figure = "comparison_cases.png"
                comparison_grid(tmp / figure, rows, notes=skipped,
                                title=f"{len(rows)} of {len(cases)} cases" if len(cases) > len(rows) else None)
            write_index(tmp / "index.html", entries, title=f"voxplain: {len(cases)} cases", figure=figure)
    return out


def layer_by_layer(run: Run, layers: Sequence[str] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, str], list[dict[str, Any]]]:
    """Grad-CAM of the run's target at every conv layer in network order: ``(CAMs, figure titles, layer table)``.

    CAMs are upsampled to the input, (1, *spatial) per layer; titles name layers
    like ``enc 1`` / ``bottleneck`` / ``dec 1`` / ``head``
    (:func:`~voxplain.report.layer_labels.short_layer_labels`) with their output
    size; the table lists label, module path and output shape of each layer (for
    ``summary.json``). The layers' shapes come from the run's trace (no extra forward).
    ``layers``: names to use instead of the conv blocks.
    """
    from ..methods.gradcam import layer_cams

    cams = layer_cams(run, layers)
    traced = {info.name: info.output_shape for info in run.trace() if info.output_shape is not None}
    shapes = [(n, tuple(traced[n][1:])) for n in cams if n in traced]
    labels = short_layer_labels(shapes, tuple(run.output.shape[1:]))
    table = [{"label": labels.get(n, n), "module": n, "output_shape": list(shape)} for n, shape in shapes]
    titles = {n: f"{labels[n]} · {'×'.join(str(d) for d in shape[1:])}" for n, shape in shapes if n in labels}
    return {n: cam[0].detach().to("cpu", torch.float32).numpy() for n, cam in cams.items()}, titles, table


def inspect_case(loaded: LoadedModel, case: Case, task: str, target_spec: str | None, device=None,
                 layer: str | None = None, normalise: bool = True, batch_size: int | None = None,
                 memory_budget: str | None = None, region: str | None = None, grid: ModelGrid | None = None
                 ) -> tuple[Study, ScanSpace | None, np.ndarray, str]:
    """Grad-CAM at every conv layer (network order) and the activations of one layer, for one case.

    The first target of ``target_spec`` that is not skipped is inspected (segmentation:
    pooled over ``region``, default the predicted voxels). Returns the study (its
    ``layers`` hold the CAMs; its maps the CAMs of the first, middle and last layer,
    for the viewer and NIfTI files), where its maps go, the chosen layer's per-filter
    activations (K, *layer spatial) and that layer's name.
    """
    from ..methods.layer_select import inspection_layers, resolve_layer

    grid = grid if grid is not None else model_grid(loaded.config, loaded.bundle)
    prepared = prepare_case(case, loaded.model, loaded.config, normalise, grid=grid)
    with open_case(loaded, prepared.x, task, target_spec, device, region, prepared.seg, case.name,
                   batch_size=batch_size, memory_budget=memory_budget,
                   sliding_window=grid.sliding_window) as (run, choices):
        choice = next((c for c in choices if c.target is not None), None)
        if choice is None:
            raise ValueError(f"nothing to inspect in {case.name}: "
                             + "; ".join(f"{c.label}: {c.skipped}" for c in choices) + "; try --region all")
        output = run.output.cpu()
        chosen = inspection_layers(run.engine, run.trace_rows, run.trace())
        if layer is None:
            layer = chosen[len(chosen) // 2][0] if chosen else None
        # read from the first forward while the run still keeps it, before the CAMs' pass
        activations = run.layer_outputs([resolve_layer(loaded.model, layer)])[0].cpu() if layer else None
        # no conv blocks to follow: Grad-CAM at the layer named with --layer (with none, a clear error)
        layers, titles, table = layer_by_layer(run, None if chosen or layer is None else [layer])
    if activations.ndim != prepared.x.ndim:
        raise ValueError(f"layer {layer!r} has no spatial output to show per filter")
    labels = {row["module"]: row["label"] for row in table}
    names = list(layers)
    shown = {choice.label: {f"gradcam@{labels.get(n, n)}": layers[n]
                            for n in dict.fromkeys([names[0], names[len(names) // 2], names[-1]])}}
    spacing = prepared.spacing or case.spacing
    prediction = case_prediction(output, loaded.config, task, spacing, prepared.seg,
                                 case.label_among(channel_names(loaded.config, task)))
    settings = {"model": loaded.spec, "task": task, "target": choice.label, "pooling": choice.pooling,
                "layers": table, "filters_of": layer, "preprocessing": prepared.notes}
    if grid.sliding_window is not None:
        settings["filters_shown_on"] = "the central window"
    study = Study(case.name, prepared.x[0].numpy(), _channels(case, prepared), shown, prediction=prediction,
                  settings=settings, spacing=spacing, layers=layers, targets={choice.label: target_info(choice)},
                  skipped={c.label: c.skipped for c in choices if c.skipped}, layer_labels=titles)
    return study, _scan_space(case, prepared), activations[0].numpy(), layer


def run_inspect(model: str, inputs: Sequence[str], out: str | os.PathLike, task: str, target: str | None = None,
                layer: str | None = None, weights: str | None = None, device=None,
                allow_unsafe_pickle: bool = False, channels: int | None = None, command: str = "",
                batch_size: int | None = None, memory_budget: str | None = None, output_key=None,
                region: str | None = None, channels_from_4d: bool = False, spacing=None, pad_multiple=None,
                sliding_window=None, random_weights: bool = False) -> Path:
    """``voxplain inspect``: layer-by-layer Grad-CAM and per-filter activations, one report per case.

    ``spacing``, ``pad_multiple``, ``sliding_window``, ``random_weights``: as for :func:`run_explain`.
    """
    from .figures import filter_grid

    out = check_output_folder(out, "inspect")
    loaded = load_model_spec(model, weights, allow_unsafe_pickle, random_weights)
    loaded.output_key = output_key
    grid = model_grid(loaded.config, loaded.bundle, spacing, pad_multiple, sliding_window)
    cases = load_cases(inputs, channels, channels_from_4d)
    settings = {"command": command, "model": model, "inputs": [str(i) for i in inputs], "task": task,
                "target": target, "region": region or DEFAULT_REGION if task == "segment" else None, "layer": layer,
                **_model_settings(loaded, grid)}
    folders = unique_slugs([case.name for case in cases])
    with atomic_dir(out, kind="inspect") as tmp:
        entries = []
        for case, sub in zip(cases, folders):
            study, scan, acts, chosen = inspect_case(loaded, case, task, target, device, layer,
                                                     batch_size=batch_size, memory_budget=memory_budget,
                                                     region=region, grid=grid)
            folder = tmp / sub if len(cases) > 1 else tmp
            rel = f"figures/filters_{slug(chosen)}.png"
            filter_grid(folder / rel, acts, chosen)
            write_report(folder, [study], settings=settings, scans={study.name: scan} if scan else None,
                         figures=[(f"Activations of {chosen}, one panel per filter", rel)],
                         title=f"voxplain inspect: {case.name}", alerts=model_alerts(loaded))
            entries.append((case.name, f"{folder.relative_to(tmp).as_posix()}/report.html" if len(cases) > 1
                            else "report.html", prediction_line(study.prediction)))
        if len(cases) > 1:
            write_index(tmp / "index.html", entries, title=f"voxplain inspect: {len(cases)} cases")
    return out
