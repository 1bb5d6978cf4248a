"""From a model and an input on disk to a report folder: what ``voxplain explain`` and ``inspect`` do.

Each step is a small function: load the model (and its checkpoint config),
prepare a case for the model (normalise, crop or pad, remembering how to undo
it), turn the command's target spec into targets, explain, and write the report.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
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
from .study import Study
from .summary import jsonable, methods_summary, prediction_summary
from .writer import ScanSpace, slug, unique_slugs, write_index, write_report

__all__ = ["LoadedModel", "load_model_spec", "check_output_folder", "prepare_case", "Prepared", "parse_targets",
           "open_case", "explain_case", "inspect_case", "run_explain", "run_inspect"]


@dataclass
class LoadedModel:
    """A model and what its checkpoint says about it (empty for other model kinds).

    ``output_key``: for a model returning a tuple, list or dict, which output to explain.
    """

    model: nn.Module
    config: dict = field(default_factory=dict)
    spec: str = ""
    output_key: Any = None


def load_model_spec(spec: str, weights: str | None = None, allow_unsafe_pickle: bool = False) -> LoadedModel:
    """Load ``spec`` (checkpoint folder, shipped model name, ``module:factory`` + weights, TorchScript file)."""
    from ..models.checkpoint import is_checkpoint_path, load_checkpoint, load_model, resolve_model_spec

    path = resolve_model_spec(spec)
    if is_checkpoint_path(path):
        model, config = load_checkpoint(path, weights)
        return LoadedModel(model, config, str(spec))
    return LoadedModel(load_model(spec, weights, allow_unsafe_pickle=allow_unsafe_pickle), {}, str(spec))


@dataclass
class Prepared:
    """A case made ready for the model: ``x`` (1, C, *spatial) and the way back to the scan's grid."""

    x: torch.Tensor
    to_scan: Callable[[np.ndarray], np.ndarray] | None
    notes: dict[str, Any]


def _multiple(model: nn.Module) -> int:
    """The size multiple a model's spatial input needs (U-Nets with k downsamplings need 2^k)."""
    for m in model.modules():
        value = getattr(m, "multiple", None)
        if isinstance(value, int) and value > 1:
            return value
    return 1


def prepare_case(case: Case, model: nn.Module, config: dict | None = None, normalise: bool = True,
                 size: Sequence[int] | None = None, centre: Sequence[float] | None = None) -> Prepared:
    """Normalise a case like the model's training data and fit its grid to the model.

    Volumes: z-score per modality over non-zero voxels; cropped or padded to the
    checkpoint's ``input_size`` around the foreground, else zero-padded to the
    size multiple a U-Net needs. 2D images: values in [0, 1]; resized to the
    checkpoint's ``input_size`` if it has one. ``size`` and ``centre`` (voxels)
    override the volume crop (e.g. a small box around a tumour).
    """
    from ..data.preprocess import crop_box, crop_or_pad, foreground_centre, zscore_nonzero

    config = config or {}
    image = case.image
    notes: dict[str, Any] = {}
    if case.is_volume and normalise:
        image = zscore_nonzero(image)
        notes["normalise"] = "z-score per channel over non-zero voxels"
    size = size if size is not None else config.get("input_size")
    to_scan = None
    if case.is_volume:
        spatial = image.shape[1:]
        if size is not None and len(size) == 3:
            # the centre of the raw scan's foreground, as the training datasets crop
            if centre is None:
                centre = foreground_centre(case.image)
            image, box = crop_or_pad(image, size, centre=centre, return_box=True)
            notes["crop_or_pad"] = list(size)
        else:
            k = _multiple(model)
            target = tuple(int(math.ceil(n / k) * k) for n in spatial)
            box = crop_box(spatial, target)
            image = box.apply(image)
            if target != tuple(spatial):
                notes["pad_to_multiple_of"] = k
        if tuple(box.size) != tuple(box.source_shape) or any(box.start):
            to_scan = box.restore
    elif size is not None and len(size) == 2 and tuple(size) != tuple(image.shape[1:]):
        from skimage.transform import resize

        image = resize(image, (image.shape[0], *size), order=1, preserve_range=True, anti_aliasing=True)
        notes["resized_to"] = list(size)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return Prepared(x, to_scan, notes)


def _names_for(config: dict, task: str) -> list[str] | None:
    key = "class_names" if task == "classify" else "region_names"
    names = config.get(key)
    return [str(n) for n in names] if names else None


def parse_targets(task: str, spec: str | None, output: torch.Tensor, config: dict | None = None,
                  region: str | None = None) -> list[tuple[str, Target]]:
    """The targets to explain, as ``(label, target)`` pairs.

    ``spec``: comma-separated class/channel indices or names (from the checkpoint),
    ``"predicted"`` (classification default) or ``"all"`` (segmentation default:
    every output channel).
    """
    from ..targets import ClassTarget

    config = config or {}
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    if task == "classify" and output.ndim != 2:
        raise ValueError(f"--task classify needs a model with a (B, K) output, this one gives "
                         f"{tuple(output.shape)}; use --task segment")
    if task == "segment" and output.ndim < 3:
        raise ValueError(f"--task segment needs a model with a (B, K, *spatial) output, this one gives "
                         f"{tuple(output.shape)}; use --task classify")
    k = output.shape[1]
    names = _names_for(config, task)
    spec = (spec or ("predicted" if task == "classify" else "all")).strip()
    if spec == "predicted":
        if task != "classify":
            raise ValueError("--target predicted is for classification; name segmentation channels or use 'all'")
        c = int(output[0].argmax())
        return [(f"predicted {names[c] if names and c < len(names) else c}", ClassTarget(c))]
    indices = list(range(k)) if spec == "all" else []
    if spec != "all":
        for item in (s.strip() for s in spec.split(",")):
            if names and item in names:
                indices.append(names.index(item))
            elif item.lstrip("-").isdigit():
                indices.append(int(item))
            else:
                known = f"; known names: {', '.join(names)}" if names else ""
                raise ValueError(f"--target {item!r} is not a class index{' or name' if names else ''}{known}")
    out = []
    for i in indices:
        if not 0 <= i < k:
            raise IndexError(f"--target {i} is out of range: the model has {k} output "
                             f"{'class' if task == 'classify' else 'channel'}(s), valid 0..{k - 1}")
        label = names[i] if names and i < len(names) else f"{'class' if task == 'classify' else 'channel'} {i}"
        if task == "classify":
            out.append((label, ClassTarget(i)))
        else:
            activation = "sigmoid" if _independent(config) else "softmax"
            out.append((label, SegmentationTarget(i, region=region, activation=activation)))
    return out


#: cases shown in the comparison grid of a folder of cases (one row each)
MAX_CASE_ROWS = 8


def _independent(config: dict) -> bool:
    """True when the checkpoint says its output channels are independent sigmoid regions."""
    return "sigmoid" in str(config.get("output", ""))


@contextlib.contextmanager
def open_case(loaded: LoadedModel, x: torch.Tensor, task: str, target_spec: str | None, device=None,
              region: str | None = None, **kwargs) -> Iterator[tuple[Run, list[tuple[str, Target]]]]:
    """:func:`~voxplain.run.open_run` on a prepared case, its targets chosen from the model's output.

    Yields the run, which explains the first target, and every ``(label, target)``
    pair of the command's target spec (:func:`parse_targets`); explain the others
    with ``run.retarget(target)``. ``kwargs`` as for ``open_run``.
    """
    targets: list[tuple[str, Target]] = []

    def first_target(output: torch.Tensor) -> Target:
        targets.extend(parse_targets(task, target_spec, output.cpu(), loaded.config, region))
        return targets[0][1]

    with open_run(loaded.model, x, first_target, device=device, output_key=loaded.output_key, **kwargs) as run:
        yield run, targets


def explain_case(loaded: LoadedModel, case: Case, task: str, target_spec: str | None, methods: Sequence[str],
                 options: dict | None = None, device=None, seed: int = 0, progress: bool = False,
                 batch_size: int | None = None, memory_budget: str | None = None, region: str | None = None,
                 normalise: bool = True, name: str | None = None, size: Sequence[int] | None = None,
                 centre: Sequence[float] | None = None) -> tuple[Study, ScanSpace | None]:
    """Explain one case with every method for every target; returns the study and where its maps go."""
    from ..methods import create_methods

    prepared = prepare_case(case, loaded.model, loaded.config, normalise, size, centre)
    method_objs = create_methods(methods, options)
    class_names = _names_for(loaded.config, task)
    maps: dict[str, dict[str, Any]] = {}
    per_target: dict[str, Any] = {}
    with open_case(loaded, prepared.x, task, target_spec, device, region, seed=seed, progress=progress,
                   batch_size=batch_size, memory_budget=memory_budget) as (first, targets):
        output = first.output.cpu()
        for i, (label, target) in enumerate(targets):
            expl = (first if i == 0 else first.retarget(target)).explain(method_objs)
            maps[label] = {m: v[0].numpy() for m, v in expl.maps.items()}
            per_target[label] = {"target": jsonable(expl.target), "explained_score": round(float(expl.scores[0]), 6),
                                 "methods": methods_summary(expl)}
    prediction = prediction_summary(output, 0, class_names, independent=_independent(loaded.config))
    prediction["targets"] = {label: {"explained_score": v["explained_score"]} for label, v in per_target.items()}
    model_info = {k: loaded.config[k] for k in ("model", "model_config", "task") if k in loaded.config}
    settings = {"model": loaded.spec, "model_config": jsonable(model_info),
                "task": task, "preprocessing": prepared.notes, "targets": per_target}
    study = Study(name or case.name, prepared.x[0].numpy(), case.channels, maps, prediction=prediction,
                  settings=settings, spacing=case.spacing)
    scan = ScanSpace(case.meta, prepared.to_scan) if case.meta is not None else None
    return study, scan


def check_output_folder(out: str | os.PathLike, kind: str = "explain") -> Path:
    """``out`` as a path, refusing (early, before any work) what :func:`voxplain.atomic.check_replaceable` refuses.

    The output folder is replaced as a whole once the new one is complete, so only an
    empty folder or an earlier output of the same ``kind`` that holds nothing else is taken.
    """
    return check_replaceable(out, kind)


def run_explain(model: str, inputs: Sequence[str], out: str | os.PathLike, task: str, target: str | None,
                methods: Sequence[str], weights: str | None = None, options: dict | None = None, device=None,
                seed: int = 0, progress: bool = False, batch_size: int | None = None,
                memory_budget: str | None = None, region: str | None = None, allow_unsafe_pickle: bool = False,
                channels: int | None = None, command: str = "", output_key=None) -> Path:
    """``voxplain explain``: one report folder, or one per case plus ``index.html`` for a folder of cases."""
    from ..methods import create_method

    out = check_output_folder(out, "explain")
    for m in methods:  # fail on a bad method name before loading anything large
        create_method(m, (options or {}).get(m))
    loaded = load_model_spec(model, weights, allow_unsafe_pickle)
    loaded.output_key = output_key
    cases = load_cases(inputs, channels)
    settings = {"command": command, "model": model, "weights": weights, "inputs": [str(i) for i in inputs],
                "task": task, "target": target, "methods": list(methods), "options": options or {}, "seed": seed,
                "device": str(device or "model's device")}
    if output_key is not None:
        settings["output_key"] = output_key
    folders = unique_slugs([case.name for case in cases])
    with atomic_dir(out, kind="explain") as tmp:
        entries, rows = [], []
        for case, sub in zip(cases, folders):
            study, scan = explain_case(loaded, case, task, target, methods, options, device, seed, progress,
                                       batch_size, memory_budget, region)
            folder = tmp / sub if len(cases) > 1 else tmp
            write_report(folder, [study], settings=settings, scans={study.name: scan} if scan else None,
                         title=f"voxplain: {case.name}")
            pred = study.prediction.get("predicted_label", study.prediction.get("predicted_class",
                                        study.prediction.get("voxels_per_channel", "")))
            entries.append((case.name, f"{folder.relative_to(tmp).as_posix()}/report.html" if len(cases) > 1
                            else "report.html", str(pred)))
            if len(rows) < MAX_CASE_ROWS:  # the first target of each case, for the grid with a row per case
                first = study_rows(study)[0]
                first.label = f"{case.name}\n{first.label}"
                rows.append(first)
        if len(cases) > 1:
            comparison_grid(tmp / "comparison_cases.png", rows,
                            title=f"{len(rows)} of {len(cases)} cases" if len(cases) > len(rows) else None)
            write_index(tmp / "index.html", entries, title=f"voxplain: {len(cases)} cases",
                        figure="comparison_cases.png")
    return out


def inspect_case(loaded: LoadedModel, case: Case, task: str, target_spec: str | None, device=None,
                 layer: str | None = None, normalise: bool = True, batch_size: int | None = None,
                 memory_budget: str | None = None) -> tuple[Study, ScanSpace | None, np.ndarray, str]:
    """Grad-CAM at every conv layer (network order) and the activations of one layer, for one case.

    Returns the study (its ``layers`` hold the CAMs; its maps the CAMs of the first,
    middle and last layer, for the viewer and NIfTI files), where its maps go, the
    chosen layer's per-filter activations (K, *layer spatial) and that layer's name.
    """
    from ..methods.gradcam import layer_cams
    from ..methods.layer_select import inspection_layers, resolve_layer

    prepared = prepare_case(case, loaded.model, loaded.config, normalise)
    with open_case(loaded, prepared.x, task, target_spec, device, batch_size=batch_size,
                   memory_budget=memory_budget) as (run, targets):
        label = targets[0][0]
        output = run.output.cpu()
        chosen = inspection_layers(run.engine, run.x, run.trace())
        if layer is None:
            layer = chosen[len(chosen) // 2][0] if chosen else None
        # read from the first forward while the run still keeps it, before the CAMs' pass
        activations = run.layer_outputs([resolve_layer(loaded.model, layer)])[0].cpu() if layer else None
        # no conv blocks to follow: Grad-CAM at the layer named with --layer (with none, a clear error)
        cam_layers = None if chosen or layer is None else [layer]
        cams = {name: cam.detach().to("cpu", torch.float32) for name, cam in layer_cams(run, cam_layers).items()}
    if activations.ndim != prepared.x.ndim:
        raise ValueError(f"layer {layer!r} has no spatial output to show per filter")
    layers = {name: cam[0].numpy() for name, cam in cams.items()}
    names = list(layers)
    shown = {f"{label}": {f"gradcam@{n}": layers[n] for n in dict.fromkeys([names[0], names[len(names) // 2],
                                                                            names[-1]])}}
    prediction = prediction_summary(output, 0, _names_for(loaded.config, task), independent=_independent(loaded.config))
    study = Study(case.name, prepared.x[0].numpy(), case.channels, shown, prediction=prediction,
                  settings={"model": loaded.spec, "task": task, "target": label, "layers": names,
                            "filters_of": layer, "preprocessing": prepared.notes},
                  spacing=case.spacing, layers=layers)
    scan = ScanSpace(case.meta, prepared.to_scan) if case.meta is not None else None
    return study, scan, activations[0].numpy(), layer


def run_inspect(model: str, inputs: Sequence[str], out: str | os.PathLike, task: str, target: str | None = None,
                layer: str | None = None, weights: str | None = None, device=None,
                allow_unsafe_pickle: bool = False, channels: int | None = None, command: str = "",
                batch_size: int | None = None, memory_budget: str | None = None, output_key=None) -> Path:
    """``voxplain inspect``: layer-by-layer Grad-CAM and per-filter activations, one report per case."""
    from .figures import filter_grid

    out = check_output_folder(out, "inspect")
    loaded = load_model_spec(model, weights, allow_unsafe_pickle)
    loaded.output_key = output_key
    cases = load_cases(inputs, channels)
    settings = {"command": command, "model": model, "inputs": [str(i) for i in inputs], "task": task,
                "target": target, "layer": layer}
    folders = unique_slugs([case.name for case in cases])
    with atomic_dir(out, kind="inspect") as tmp:
        entries = []
        for case, sub in zip(cases, folders):
            study, scan, acts, chosen = inspect_case(loaded, case, task, target, device, layer,
                                               batch_size=batch_size, memory_budget=memory_budget)
            folder = tmp / sub if len(cases) > 1 else tmp
            rel = f"figures/filters_{slug(chosen)}.png"
            filter_grid(folder / rel, acts, chosen)
            write_report(folder, [study], settings=settings, scans={study.name: scan} if scan else None,
                         figures=[(f"Activations of {chosen}, one panel per filter", rel)],
                         title=f"voxplain inspect: {case.name}")
            entries.append((case.name, f"{folder.relative_to(tmp).as_posix()}/report.html" if len(cases) > 1
                            else "report.html", str(study.prediction.get("predicted_class", ""))))
        if len(cases) > 1:
            write_index(tmp / "index.html", entries, title=f"voxplain inspect: {len(cases)} cases")
    return out
