"""Hand the sweep's best model to CXAI stage 2: explain held-out images and write a report."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_dir
from ..explain import explain_detailed
from ..models.checkpoint import load_checkpoint_folder
from ..report import Study, prediction_summary, write_report
from .data import SweepData

__all__ = ["CXAI_METHODS", "explain_best"]

#: CXAI's stage-2 methods.
CXAI_METHODS = ("xrai", "blur_ig", "guided_ig", "vanilla_gradient", "integrated_gradients", "smoothgrad_ig")

# Light settings: the sweep's images are small and a report per held-out image is wanted quickly.
_OPTIONS = {"guided_ig": {"steps": 50}, "blur_ig": {"steps": 32}, "integrated_gradients": {"steps": 32},
            "smoothgrad_ig": {"samples": 8, "base_options": {"steps": 16}}}


def _pick_images(data: SweepData, per_class: int) -> list[int]:
    """The first ``per_class`` held-out images of every class."""
    picked = []
    for c in range(len(data.class_names)):
        picked += (data.val_y == c).nonzero()[:per_class, 0].tolist()
    return picked


def explain_best(model_dir: str | Path, data: SweepData, out: str | Path, per_class: int = 2, seed: int = 0,
                 progress: bool = False) -> Path:
    """Explain the model in checkpoint folder ``model_dir`` on held-out images of ``data``; returns the report's path.

    ``model_dir`` may come from the sweep's storage, so it is only ever read as a
    checkpoint folder (never imported as ``module:factory`` code).
    """
    model, _ = load_checkpoint_folder(model_dir)
    studies = []
    for i in _pick_images(data, per_class):
        x = data.val_x[i:i + 1]
        label = data.class_names[int(data.val_y[i])]
        result = explain_detailed(model, x, None, methods=list(CXAI_METHODS), options=_OPTIONS, seed=seed,
                                  progress=progress)
        predicted = int(result.target["classes"][0])
        studies.append(Study(
            name=f"held-out image {i} (true: {label})", image=x[0], channels=data.channel_names,
            maps={f"class {data.class_names[predicted]}": {m: v[0] for m, v in result.maps.items()}},
            prediction=prediction_summary(result.output, class_names=data.class_names),
            settings={"options": result.options, "seconds": result.seconds, "target": result.target}))
    with atomic_dir(out, kind="sweep-report") as tmp:
        write_report(tmp, studies, settings={"stage": "CXAI stage 2", "model": str(model_dir), "seed": seed},
                     title="CXAI stage 2: the sweep's best model")
    return Path(out) / "report.html"
