"""``voxplain demo``: NeuroXAI's and CXAI's showcases on a synthetic subject with the shipped models.

Nothing is downloaded: the subject comes from :func:`voxplain.data.phantom.generate_cohort`
and the three small models are checkpoints in ``voxplain/assets/models`` (how they
were trained: ``voxplain/assets/models/README.md``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .explain import DEFAULT_METHODS

__all__ = ["run_demo", "PRESETS", "DemoPreset", "CXAI_METHODS", "NEUROXAI_METHODS", "demo_model_path"]

NEUROXAI_METHODS = DEFAULT_METHODS
#: CXAI's stage 2, on the 2D slice model
CXAI_METHODS = ("xrai", "blur_ig", "guided_ig", "vanilla_gradient", "integrated_gradients", "smoothgrad_ig")
MODELS = {"grade": "demo-grade", "segment": "demo-unet", "slices": "demo-slices"}


@dataclass(frozen=True)
class DemoPreset:
    """How big and how thorough the demo is.

    ``crop``: the 3D models see a box of this many voxels around the tumour
    (``None``: the models' own input size around the brain). ``options3d`` /
    ``options2d``: method options for the volume and slice showcases.
    """

    crop: tuple[int, int, int] | None
    options3d: dict[str, dict[str, Any]] = field(default_factory=dict)
    options2d: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolution: int = 3


PRESETS: dict[str, DemoPreset] = {
    "tiny": DemoPreset(
        crop=(24, 24, 24),
        options3d={"integrated_gradients": {"steps": 4}, "guided_ig": {"steps": 4}, "smoothgrad": {"samples": 2}},
        options2d={"xrai": {"steps": 4}, "blur_ig": {"steps": 4}, "guided_ig": {"steps": 4},
                   "integrated_gradients": {"steps": 4},
                   "smoothgrad_ig": {"samples": 2, "base_options": {"steps": 4}}},
    ),
    "default": DemoPreset(
        crop=None,
        options3d={"integrated_gradients": {"steps": 16}, "guided_ig": {"steps": 16}, "smoothgrad": {"samples": 8}},
        options2d={"xrai": {"steps": 32}, "blur_ig": {"steps": 32}, "guided_ig": {"steps": 32},
                   "integrated_gradients": {"steps": 32},
                   "smoothgrad_ig": {"samples": 8, "base_options": {"steps": 16}}},
    ),
}


def demo_model_path(name: str) -> Path:
    """Folder of a shipped demo checkpoint (``demo-grade``, ``demo-unet``, ``demo-slices``)."""
    from .models.checkpoint import shipped_checkpoint

    return shipped_checkpoint(name)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _tumour_centre(seg: np.ndarray) -> tuple[float, ...]:
    where = np.argwhere(seg > 0)
    if not len(where):
        return tuple((n - 1) / 2 for n in seg.shape)
    return tuple(float(c) for c in where.mean(axis=0))


def _slice_case(case, config: dict):
    """The axial slice with the most tumour, normalised and cropped like the slice model's training data."""
    from .data.preprocess import crop_or_pad, foreground_centre, zscore_nonzero
    from .report.inputs import Case

    z = int(np.argmax((case.seg > 0).sum(axis=(0, 1))))
    plane = zscore_nonzero(case.image)[..., z]
    size = tuple(config.get("input_size") or plane.shape[1:])
    centre = foreground_centre(case.image)[:2]
    image = crop_or_pad(plane, size, centre=centre)
    seg = None if case.seg is None else crop_or_pad(case.seg[..., z], size, centre=centre)
    # the slice with the most tumour: its label is "tumour" (the slice model's positive class)
    return Case(f"{case.name} axial slice z={z}", np.ascontiguousarray(image), list(case.channels),
                seg=seg, facts={"label": "tumour"}), z


def run_demo(out: str | os.PathLike = "demo-output", preset: str = "default", seed: int = 0, device=None,
             progress: bool = True, region: str = "predicted") -> Path:
    """Run the four showcases and write the report folder ``out`` (replaced only when complete).

    ``region``: what the U-Net's region channels are averaged over (see ``voxplain explain --region``).
    """
    from .data.brats import load_brats_case
    from .data.phantom import generate_cohort
    from .report.inputs import Case
    import torch

    from .report.pipeline import check_output_folder, explain_case, layer_by_layer, load_model_spec, open_case, \
        prepare_case
    from .report.writer import write_report

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = check_output_folder(out, "demo")
    models = {key: load_model_spec(str(demo_model_path(name))) for key, name in MODELS.items()}
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with atomic_dir(out, kind="demo") as tmp:
        _say(progress, f"demo ({preset}): generating a synthetic subject ...")
        t = time.perf_counter()
        generate_cohort(tmp / "input", subjects=1, seed=seed, resolution=p.resolution)
        loaded_case = load_brats_case(next(d for d in sorted((tmp / "input").iterdir()) if d.is_dir()))
        case = Case(loaded_case.name, loaded_case.image, list(loaded_case.modalities), loaded_case.meta,
                    loaded_case.seg, _facts(tmp / "input", loaded_case.name))
        timings["subject"] = time.perf_counter() - t
        centre = _tumour_centre(case.seg) if p.crop is not None else None
        common = dict(device=device, seed=seed, progress=progress)

        _say(progress, "demo: 1/4 glioma grade, 3D classifier, NeuroXAI's seven methods ...")
        t = time.perf_counter()
        grade, grade_scan = explain_case(models["grade"], case, "classify", "predicted", NEUROXAI_METHODS,
                                         p.options3d, name="Glioma grade (3D classifier)", size=p.crop,
                                         centre=centre, **common)
        timings["grade"] = time.perf_counter() - t

        _say(progress, "demo: 2/4 ET/TC/WT segmentation, 3D U-Net, seven methods per region ...")
        t = time.perf_counter()
        seg, seg_scan = explain_case(models["segment"], case, "segment", "all", NEUROXAI_METHODS, p.options3d,
                                     name="Sub-region segmentation (3D U-Net)", size=p.crop, centre=centre,
                                     region=region, **common)
        timings["segmentation"] = time.perf_counter() - t

        _say(progress, "demo: 3/4 network inspection, Grad-CAM at every conv layer of the U-Net ...")
        t = time.perf_counter()
        x = torch.from_numpy(seg.image)[None]
        truth = prepare_case(case, models["segment"].model, models["segment"].config, True, p.crop, centre).seg
        with open_case(models["segment"], x, "segment", "all", device, region, truth, case.name) as (run, choices):
            explainable = [c for c in choices if c.target is not None]
            if explainable:
                choice = next((c for c in explainable if c.label == "WT"), explainable[0])
                seg.layers, seg.layer_labels, table = layer_by_layer(
                    run if choice is explainable[0] else run.retarget(choice.target))
                seg.settings["inspection"] = {"target": choice.label, "pooling": choice.pooling, "layers": table}
            else:
                seg.settings["inspection"] = {"skipped": "the U-Net predicts none of its regions on this subject"}
        timings["inspection"] = time.perf_counter() - t

        _say(progress, "demo: 4/4 tumour vs no tumour, 2D slice CNN, CXAI's stage 2 ...")
        t = time.perf_counter()
        slice_case, z = _slice_case(case, models["slices"].config)
        tumour = models["slices"].config.get("class_names", ["no tumour", "tumour"])
        target = str(tumour.index("tumour")) if "tumour" in tumour else "predicted"
        slices, _ = explain_case(models["slices"], slice_case, "classify", target, CXAI_METHODS, p.options2d,
                                 name="Tumour vs no tumour (2D slice CNN)", normalise=False, **common)
        slices.settings["slice"] = {"axis": "axial", "index": z}
        slices.ras_plane = True  # a (C, X, Y) plane of the RAS volume
        timings["slices"] = time.perf_counter() - t

        settings = {"command": "voxplain demo", "preset": preset, "seed": seed, "device": str(device or "cpu"),
                    "subject": {"generator": "voxplain.data.phantom.generate_cohort", "resolution_mm": p.resolution,
                                "files": f"input/{case.name}/"},
                    "crop": list(p.crop) if p.crop else "models' input size around the brain",
                    "models": {k: str(MODELS[k]) for k in MODELS}, "options3d": p.options3d,
                    "options2d": p.options2d}
        t = time.perf_counter()
        _say(progress, "demo: writing the report ...")
        write_report(tmp, [grade, seg, slices], settings=settings,
                     scans={grade.name: grade_scan, seg.name: seg_scan}, title="voxplain demo")
        timings["report"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        _write_timings(tmp / "timings.json", timings)
    return out


def _facts(root: Path, name: str) -> dict[str, str]:
    """The phantom's subjects.csv row of the subject (its grade is the classifier's case label)."""
    from .data.brats import read_subjects_table

    try:
        return {str(k): str(v) for k, v in read_subjects_table(root).get(name, {}).items()}
    except (OSError, ValueError):
        return {}



def _write_timings(path: Path, timings: dict[str, float]) -> None:
    from .report.summary import write_json

    write_json(path, {k: round(v, 2) for k, v in timings.items()})
