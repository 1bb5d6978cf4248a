"""Checkerboard in input-gradient maps: how much of a map's power sits on the stride lattice.

A network that halves and doubles resolution with stride-2 convolutions and their
transposes (MONAI's UNet) backpropagates through kernels that overlap unevenly: its
input gradients carry a pattern that repeats every 2 voxels (one stride-2 level) and
every 4 voxels (two levels), the "checkerboard". All power of a pattern of period 2
or 4 along each axis lies on a small set of frequencies, which this script measures.

Definition (the number the assets README reports):

    g         the input gradient of one target, (C, X, Y, Z) (a voxplain map: vanilla
              gradient or guided backprop), on the model's input grid;
    P(f)      sum over channels c of |DFT(g_c)(f)|^2, for the grid frequencies
              f = (kx / X, ky / Y, kz / Z) cycles per voxel;
    L4        the stride lattice: frequencies whose every component is a multiple of
              1/4 cycle per voxel (0, 1/4, 1/2 = Nyquist, 3/4 = -1/4), zero excluded:
              4^3 - 1 = 63 bins when X, Y, Z are multiples of 4;
    share     sum of P over L4 / sum of P over all frequencies but zero.

A map with no periodic imprint puts about |L4| / (XYZ - 1) of its power on L4 (white
noise: 63 / 147455 = 0.0004 on a 48 x 64 x 48 grid; a smooth map less); a
checkerboard puts a large part there. ``share_nyquist`` is the same with the period-2
lattice L2 (components 0 or 1/2, 7 bins). The target is what ``voxplain explain
--task segment`` explains: the mean sigmoid probability of one region channel over
the volume (NeuroXAI's pooled score), for each region; a classifier's predicted class.

    python benchmarks/bench_checkerboard.py --model old=/tmp/old-demo-unet --model new=src/voxplain/assets/models/demo-unet \\
        --cohort build/demo-models/test --cases 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from voxplain import explain
from voxplain.data.brats import find_brats_cases, load_brats_case
from voxplain.data.preprocess import crop_or_pad, foreground_centre, zscore_nonzero
from voxplain.models.checkpoint import load_checkpoint
from voxplain.targets import ClassTarget, SegmentationTarget


def lattice_share(grad: np.ndarray, period: int = 4) -> float:
    """Share of the power of ``grad`` (C, *spatial) on frequencies that are multiples of 1/period per axis.

    The zero frequency is left out of both sums. Axes whose length is not a multiple of
    ``period`` contribute only the frequencies that fall exactly on the lattice.
    """
    axes = tuple(range(1, grad.ndim))
    power = (np.abs(np.fft.fftn(grad.astype(np.float64), axes=axes)) ** 2).sum(axis=0)
    total = power.sum() - power.flat[0]
    if total <= 0:
        return 0.0
    on = np.ix_(*[[k for k in range(n) if (k * period) % n == 0] for n in power.shape])
    return float((power[on].sum() - power.flat[0]) / total)


def lattice_bins(shape, period: int = 4) -> int:
    """Number of non-zero lattice frequencies on a grid of ``shape``."""
    return int(np.prod([len([k for k in range(n) if (k * period) % n == 0]) for n in shape])) - 1


def model_input(case, config: dict) -> torch.Tensor:
    """A case z-scored and cropped like the checkpoint's training data."""
    image = zscore_nonzero(case.image)
    size = config.get("input_size")
    if size:
        image = crop_or_pad(image, size, centre=foreground_centre(case.image))
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]


def targets_of(config: dict) -> list[tuple[str, object]]:
    """The targets the explain command makes by default: every region channel, or the predicted class."""
    if config.get("task") == "segment":
        names = config.get("region_names") or []
        return [(name, SegmentationTarget(i, activation="sigmoid")) for i, name in enumerate(names)]
    return [("predicted class", ClassTarget(None))]


def measure(path: Path, cases: list, methods: list[str]) -> dict:
    """Per method and target: the lattice shares over ``cases`` (mean, min, max)."""
    model, config = load_checkpoint(path)
    rows: dict = {}
    shape = None
    for case in cases:
        x = model_input(case, config)
        shape = tuple(x.shape[2:])
        for label, target in targets_of(config):
            maps = explain(model, x, target, methods=methods, seed=0)
            for method, grad in maps.items():
                g = grad[0].numpy()
                key = f"{method} / {label}"
                rows.setdefault(key, {"share": [], "share_nyquist": []})
                rows[key]["share"].append(lattice_share(g, 4))
                rows[key]["share_nyquist"].append(lattice_share(g, 2))
    summary = {k: {m: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for m, v in vals.items()}
               for k, vals in rows.items()}
    return {"model": str(path), "architecture": config.get("model"), "grid": list(shape or ()),
            "white_noise_share": lattice_bins(shape, 4) / (int(np.prod(shape)) - 1) if shape else None,
            "cases": len(cases), "targets": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=DIR",
                        help="checkpoint folder to measure (repeatable), e.g. old=/tmp/old-unet")
    parser.add_argument("--cohort", help="phantom/BraTS cohort; default: 10 new phantom subjects (seed 3, 3 mm)")
    parser.add_argument("--cases", type=int, default=10, help="first N cases of the cohort (default 10)")
    parser.add_argument("--methods", default="vanilla_gradient,guided_backprop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cohort is None:
        import tempfile

        from voxplain.data.phantom import generate_cohort

        args.cohort = str(Path(tempfile.mkdtemp()) / "cohort")
        generate_cohort(args.cohort, subjects=args.cases, seed=3, resolution=3, healthy_fraction=0.0)
    folders = find_brats_cases(Path(args.cohort))[: args.cases]
    cases = [load_brats_case(f) for f in folders]
    cases = [c for c in cases if c.seg is None or (c.seg > 0).any()] or cases
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = {}
    for item in args.model:
        label, _, path = item.rpartition("=")
        label = label or Path(path).name
        start = time.perf_counter()
        results[label] = measure(Path(path), cases, methods)
        results[label]["seconds"] = round(time.perf_counter() - start, 1)
        res = results[label]
        print(f"\n{label}: {res['architecture']} ({res['model']}), {res['cases']} cases, grid {res['grid']}, "
              f"white-noise share {res['white_noise_share']:.5f}")
        print(f"  {'map / target':42s} {'share L4 (mean [min, max])':>30s} {'share L2 (Nyquist)':>20s}")
        for key, vals in res["targets"].items():
            s, n = vals["share"], vals["share_nyquist"]
            print(f"  {key:42s} {s['mean']:10.4f} [{s['min']:.4f}, {s['max']:.4f}] {n['mean']:20.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cohort": args.cohort, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
