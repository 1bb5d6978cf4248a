"""Benchmark: explaining a whole 1 mm BraTS-sized subject with a patch-trained 3D U-Net by sliding windows.

Not a test: it times and measures memory, and prints a table.

A phantom subject at 1 mm (``voxplain phantom --resolution 1``: the MNI152 grid,
197 x 233 x 189) is cropped/padded around the brain to the BraTS size 240 x 240 x 155,
z-scored per modality, and explained with voxplain's ``RegionUNet`` (random weights:
timings do not depend on them) applied as a patch model by
:class:`voxplain.sliding_window.SlidingWindow` (roi 96^3, overlap 0.5, Gaussian
blending, MONAI's window positions). The score is the mean WT logit over the
subject's ground-truth whole tumour: affine in the output, so every gradient is one
pass over the windows (``affine_score=True``).

* ``vanilla``: the gradient of that whole-volume score (one pass over all windows).
* ``ig``: integrated gradients, zero baseline, Gauss-Legendre nodes; one path point
  per call, so memory stays that of one call; the completeness error
  ``|sum(IG) - (F(x) - F(0))| / |F(x) - F(0)|`` is reported as a sanity check.
* ``gradcam``: Grad-CAM per window at the default CAM layer, blended with the
  window weights (the stitched whole-volume CAM).

Each method runs in a fresh subprocess; its peak resident memory (VmHWM) is
compared with the budget (default 2 GB). Timings on a loaded machine are only
indicative: the load average is printed with them.

Usage::

    python benchmarks/bench_native.py                       # vanilla, ig (32 steps), gradcam
    python benchmarks/bench_native.py --only vanilla gradcam
    python benchmarks/bench_native.py --only ig --steps 4   # IG costs `steps` times vanilla
    python benchmarks/bench_native.py --quick               # roi 48^3 on a 120 x 120 x 78 crop
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_core import peak_rss_kb

BRATS_SIZE = (240, 240, 155)
METHODS = ("vanilla", "ig", "gradcam")


def subject_folder(cohort: Path) -> Path:
    """The first subject of a 1 mm phantom cohort, generated when the folder has none."""
    found = sorted(p for p in cohort.glob("*") if p.is_dir())
    if not found:
        subprocess.run([sys.executable, "-m", "voxplain", "phantom", "--out", str(cohort), "--subjects", "1",
                        "--resolution", "1", "--seed", "0", "--quiet"], check=True)
        found = sorted(p for p in cohort.glob("*") if p.is_dir())
    return found[0]


def load_subject(folder: Path, size) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 4, *size) z-scored input and the (*size) whole-tumour mask."""
    from voxplain.data.brats import load_brats_case
    from voxplain.data.preprocess import crop_or_pad, labels_to_regions, zscore_nonzero

    case = load_brats_case(folder, require_seg=True)
    image, box = crop_or_pad(case.image, size, centre="foreground", return_box=True)
    wt = box.apply(labels_to_regions(case.seg, ("WT",))[0])
    return torch.from_numpy(zscore_nonzero(image))[None], torch.from_numpy(wt)


def child(args) -> None:
    from voxplain import Engine
    from voxplain.methods.layer_select import default_cam_layer
    from voxplain.models.zoo import build_model
    from voxplain.sliding_window import SlidingWindow

    size = tuple(int(n) for n in args.size.split(","))
    x, wt = load_subject(Path(args.subject), size)
    torch.manual_seed(0)
    model = build_model("unet3d").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sw = SlidingWindow(args.roi, overlap=0.5, mode="gaussian", sw_batch_size=args.sw_batch_size)
    n_windows = len(sw.plan(x.shape[2:]).windows)

    def score(y):  # mean WT logit over the ground-truth whole tumour: affine in y
        return (y[:, 1] * wt).flatten(1).sum(1) / wt.sum()

    before = peak_rss_kb()
    start = time.perf_counter()
    extra = {}
    if args.method == "vanilla":
        result = sw.gradients(model, x, score, affine_score=True)
        extra["abs_sum"] = float(result.inputs.abs().sum())
    elif args.method == "ig":
        nodes, weights = np.polynomial.legendre.leggauss(args.steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
        total = torch.zeros_like(x)
        for a, w in zip(alphas, weights):
            total += float(w) * sw.gradients(model, float(a) * x, score, affine_score=True).inputs
        ig = x * total
        delta = float(score(sw.forward(model, x)) - score(sw.forward(model, torch.zeros_like(x))))
        extra["completeness_error"] = abs(float(ig.sum()) - delta) / max(abs(delta), 1e-12)
        extra["steps"] = args.steps
    else:
        with Engine(model) as engine:
            layer = default_cam_layer(engine, torch.zeros((1, 4) + (args.roi,) * 3))
        names = {m: n for n, m in model.named_modules()}
        result = sw.gradients(model, x, score, capture=[layer], input_gradient=False, affine_score=True)
        extra["layer"] = names[layer]
        extra["cam_max"] = float(result.layer_maps[0].max())
    seconds = time.perf_counter() - start
    print(json.dumps({"method": args.method, "seconds": seconds, "before_kb": before, "peak_kb": peak_rss_kb(),
                      "windows": n_windows, "shape": list(x.shape), **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels (default 96)")
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--cohort", type=Path, default=None, help="a 1 mm phantom cohort (made if empty)")
    parser.add_argument("--quick", action="store_true", help="roi 48 on a 120 x 120 x 78 crop")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--subject", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        child(args)
        return
    size = (120, 120, 78) if args.quick else BRATS_SIZE
    roi = 48 if args.quick else args.roi
    cohort = args.cohort or Path(tempfile.gettempdir()) / "voxplain-bench-1mm"
    subject = subject_folder(cohort)
    print(f"subject {subject.name} (1 mm phantom) cropped/padded to {size}; RegionUNet, roi {roi}^3, overlap 0.5, "
          f"gaussian, sw_batch_size {args.sw_batch_size}; torch threads {torch.get_num_threads()}")
    print(f"{'method':<10} {'windows':>7} {'seconds':>9} {'peak RSS':>10} {'budget':>8}  notes")
    for method in args.only:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--subject", str(subject),
               "--size", ",".join(map(str, size)), "--steps", str(args.steps), "--roi", str(roi),
               "--sw-batch-size", str(args.sw_batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method:<10} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak_gb = r["peak_kb"] / 1024**2
        notes = {k: v for k, v in r.items() if k in ("steps", "completeness_error", "layer")}
        print(f"{method:<10} {r['windows']:>7} {r['seconds']:>9.1f} {peak_gb:>8.2f}GB "
              f"{'holds' if peak_gb <= args.budget_gb else 'EXCEEDED':>8}  {json.dumps(notes)}")
    print("load average:", " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
