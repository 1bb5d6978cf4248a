"""Benchmark: explaining a whole 1 mm BraTS-sized subject with patch-trained 3D networks by sliding windows.

Not a test: it times and measures memory, and prints a table.

The subject. A phantom subject at 1 mm (``voxplain phantom --resolution 1``: the
MNI152 grid, 197 x 233 x 189) is cropped/padded around the brain to the BraTS size
240 x 240 x 155 (so the grid is BraTS-sized, not a BraTS scan) and written as a
BraTS-layout case folder (affine shifted with the crop).

Three paths, each method in a fresh subprocess (peak resident memory = ``VmHWM``; the
api table also shows what the call added to the process's memory before it, which the
budget is judged on: the interpreter, torch, the model and the scan are not the call's):

* ``api`` (default): ``voxplain.explain_detailed`` with
  ``sliding_window={"roi_size": (96,) * 3, "overlap": 0.5, "mode": "gaussian"}`` and
  ``memory_budget="2GB"`` on voxplain's ``RegionUNet`` (zoo ``unet3d``; random
  weights unless ``--weights``: the cost does not depend on them). Target: the WT
  channel's logit averaged over the ground-truth whole tumour (``--region wt``; affine
  in the output, so a gradient is one pass, over the windows that reach the tumour
  only), or over all voxels (``--region all``, NeuroXAI's pooling: every window).
  Methods: ``vanilla`` (vanilla gradient), ``ig`` (integrated gradients, ``--steps``,
  Gauss-Legendre), ``gradcam`` (blended per-window Grad-CAM at the default layer).
  The model calls are counted (one call = one window batch).
* ``bundle``: ``voxplain explain`` (the CLI) on a MONAI bundle made by this script,
  shaped like ``brats_mri_segmentation`` (SegResNet ``init_filters=8``, channels
  T1c/T1/T2/FLAIR, sigmoid TC/WT/ET, ``NormalizeIntensityd``, the bundle's
  ``SlidingWindowInferer`` with roi 240 x 240 x 160, overlap 0.5), target
  "Whole tumor" (logit over all voxels), vanilla gradient and Grad-CAM; with
  ``--bundle-roi N`` the command adds ``--roi N,N,N``.
* ``core``: the raw :class:`voxplain.sliding_window.SlidingWindow` core (no run
  layer), for comparison with the API path.

Timings on a loaded machine are only indicative: the load average is printed.

Usage::

    python benchmarks/bench_native.py                                   # api: vanilla, ig (32 steps), gradcam
    python benchmarks/bench_native.py --only vanilla gradcam --region all
    python benchmarks/bench_native.py --only ig --steps 4               # extrapolate: IG costs ~steps x vanilla
    python benchmarks/bench_native.py --path bundle                     # the bundle's own inferer, via the CLI
    python benchmarks/bench_native.py --path bundle --bundle-roi 96     # the same with --roi 96,96,96
    python benchmarks/bench_native.py --path core --only vanilla        # the raw sliding-window core
    python benchmarks/bench_native.py --quick                           # roi 48 on a 120 x 120 x 78 crop
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
METHODS = {"vanilla": "vanilla_gradient", "ig": "integrated_gradients", "gradcam": "gradcam"}
MODALITIES = ("t1", "t1ce", "t2", "flair")


def subject_folder(cohort: Path) -> Path:
    """The first subject of a 1 mm phantom cohort, generated when the folder has none."""
    found = sorted(p for p in cohort.glob("*") if p.is_dir())
    if not found:
        subprocess.run([sys.executable, "-m", "voxplain", "phantom", "--out", str(cohort), "--subjects", "1",
                        "--resolution", "1", "--seed", "0", "--quiet"], check=True)
        found = sorted(p for p in cohort.glob("*") if p.is_dir())
    return found[0]


def brats_sized_case(subject: Path, size, out: Path) -> Path:
    """``subject`` cropped/padded around its brain to ``size`` and written as a BraTS-layout case (affine shifted)."""
    from voxplain.data.brats import load_brats_case
    from voxplain.data.nifti import write_nifti
    from voxplain.data.preprocess import crop_or_pad

    folder = out / f"{subject.name}_{'x'.join(map(str, size))}"
    if (folder / f"{folder.name}_seg.nii.gz").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    case = load_brats_case(subject, require_seg=True)
    image, box = crop_or_pad(case.image, size, centre="foreground", return_box=True)
    shift = np.eye(4)
    shift[:3, 3] = box.start
    affine = case.meta.ras_affine @ shift
    for c, m in enumerate(MODALITIES):
        write_nifti(image[c].astype(np.float32), affine, folder / f"{folder.name}_{m}.nii.gz")
    write_nifti(box.apply(case.seg).astype(np.int16), affine, folder / f"{folder.name}_seg.nii.gz", dtype=np.int16)
    return folder


def _count_calls(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
    return calls


def child_api(args) -> dict:
    from voxplain import SegmentationTarget, explain_detailed
    from voxplain.data.brats import load_brats_case
    from voxplain.data.preprocess import labels_to_regions, zscore_nonzero
    from voxplain.models.zoo import build_model

    case = load_brats_case(Path(args.case), require_seg=True)
    x = torch.from_numpy(zscore_nonzero(case.image))[None]
    wt = torch.from_numpy(labels_to_regions(case.seg, ("WT",))[0] > 0)
    torch.manual_seed(0)
    model = build_model("unet3d").eval()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    calls = _count_calls(model)
    window = {"roi_size": (args.roi,) * 3, "overlap": 0.5, "mode": "gaussian", "sw_batch_size": args.sw_batch_size}
    target = SegmentationTarget(1, region=wt if args.region == "wt" else None)  # WT logit: affine in the output
    method = METHODS[args.method]
    options = {"integrated_gradients": {"steps": args.steps}} if method == "integrated_gradients" else {}
    before = peak_rss_kb()
    start = time.perf_counter()
    result = explain_detailed(model, x, target, methods=[method], options=options, sliding_window=window,
                              memory_budget=f"{args.budget_gb}GB")
    seconds = time.perf_counter() - start
    from voxplain.sliding_window import SlidingWindow

    n_windows = len(SlidingWindow(args.roi, overlap=0.5).plan(x.shape[2:]).windows)
    extra = {"windows": n_windows, "model_calls": len(calls)}
    completeness = result.extras[method].get("completeness")
    if completeness:
        extra["completeness_error"] = round(completeness["error"][0], 4)
    if method == "integrated_gradients":
        extra["steps"] = args.steps
    return {"seconds": seconds, "before_kb": before, "peak_kb": peak_rss_kb(), "shape": list(x.shape), **extra}


def child_core(args) -> dict:
    """The raw SlidingWindow core (no run layer, no engine): one call per gradient, affine score."""
    from voxplain import Engine
    from voxplain.data.brats import load_brats_case
    from voxplain.data.preprocess import labels_to_regions, zscore_nonzero
    from voxplain.methods.layer_select import default_cam_layer
    from voxplain.models.zoo import build_model
    from voxplain.sliding_window import SlidingWindow

    case = load_brats_case(Path(args.case), require_seg=True)
    x = torch.from_numpy(zscore_nonzero(case.image))[None]
    wt = torch.from_numpy(labels_to_regions(case.seg, ("WT",))[0])
    torch.manual_seed(0)
    model = build_model("unet3d").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calls = _count_calls(model)
    sw = SlidingWindow(args.roi, overlap=0.5, mode="gaussian", sw_batch_size=args.sw_batch_size)

    def score(y):
        return (y[:, 1] * wt).flatten(1).sum(1) / wt.sum()

    before = peak_rss_kb()
    start = time.perf_counter()
    extra = {}
    if args.method == "vanilla":
        sw.gradients(model, x, score, affine_score=True)
    elif args.method == "ig":
        nodes, weights = np.polynomial.legendre.leggauss(args.steps)
        total = torch.zeros_like(x)
        for a, w in zip((nodes + 1) / 2, weights / 2):
            total += float(w) * sw.gradients(model, float(a) * x, score, affine_score=True).inputs
        extra["steps"] = args.steps
    else:
        with Engine(model) as engine:
            layer = default_cam_layer(engine, torch.zeros((1, 4) + (args.roi,) * 3))
        sw.gradients(model, x, score, capture=[layer], input_gradient=False, affine_score=True)
    return {"seconds": time.perf_counter() - start, "before_kb": before, "peak_kb": peak_rss_kb(),
            "windows": len(sw.plan(x.shape[2:]).windows), "model_calls": len(calls), **extra}


def make_bundle(root: Path) -> Path:
    """A bundle folder shaped like MONAI's brats_mri_segmentation (a small SegResNet), random weights."""
    from monai.networks.nets import SegResNet

    folder = root / "brats_mri_segmentation_small"
    if (folder / "models" / "model.pt").is_file():
        return folder
    network = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
               "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, **{k: v for k, v in network.items() if k != "_target_"})
    inference = {
        "imports": ["$import os"], "bundle_root": ".", "network_def": network,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [240, 240, 160], "sw_batch_size": 1,
                    "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]},
    }
    metadata = {"name": "brats_mri_segmentation (small, random weights)", "version": "bench",
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "num_channels": 4, "spatial_shape": ["8*n"] * 3,
                                         "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
                    "outputs": {"pred": {"type": "image", "num_channels": 3, "channel_def": {
                        "0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}}}}
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def run_bundle(args, case: Path, work: Path) -> None:
    bundle = make_bundle(work)
    out = work / f"bundle_out_{args.bundle_roi or 'inferer'}"
    cmd = [sys.executable, "-c", "import sys; from voxplain.cli import main; rc = main(sys.argv[1:]);"
           "print('VMHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)",
           "explain", "--model", str(bundle), "--input", str(case), "--target", "Whole tumor",
           "--methods", "vanilla_gradient,gradcam", "--memory-budget", f"{args.budget_gb}GB",
           "--out", str(out), "--quiet"]
    if args.bundle_roi:
        cmd[cmd.index("--out"):cmd.index("--out")] = ["--roi", f"{args.bundle_roi}," * 2 + str(args.bundle_roi)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    roi = f"--roi {args.bundle_roi}^3" if args.bundle_roi else "the bundle's inferer (roi 240x240x160)"
    if proc.returncode != 0:
        print(f"bundle via CLI, {roi}: exit {proc.returncode} after {seconds:.1f} s: "
              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
        return
    peak = int(proc.stdout.split("VMHWM")[1].split()[0]) / 1024**2
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["studies"][0]["settings"]["targets"]["Whole tumor"]["methods"]
    per = {m: round(v.get("seconds", float("nan")), 1) for m, v in methods.items()}
    print(f"bundle via CLI, {roi}: {seconds:.1f} s in all (process start, loading, preprocessing, report), "
          f"methods {per} s, peak RSS of the whole CLI process {peak:.2f} GB (memory_budget {args.budget_gb} GB); "
          f"windows {summary['studies'][0]['settings']['preprocessing'].get('sliding_window')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=["api", "bundle", "core"], default="api")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels (default 96)")
    parser.add_argument("--region", choices=["wt", "all"], default="wt",
                        help="pool the WT logit over the ground-truth tumour (default) or all voxels")
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--bundle-roi", type=int, default=None, help="bundle path: --roi N,N,N on the command line")
    parser.add_argument("--weights", help="api path: a RegionUNet state_dict (default random weights)")
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--cohort", type=Path, default=None, help="a 1 mm phantom cohort (made if empty)")
    parser.add_argument("--quick", action="store_true", help="roi 48 on a 120 x 120 x 78 crop")
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        result = (child_api if args.path == "api" else child_core)(args)
        print(json.dumps({"method": args.method, **result}))
        return
    size = (120, 120, 78) if args.quick else BRATS_SIZE
    args.roi = 48 if args.quick else args.roi
    work = args.cohort or Path(tempfile.gettempdir()) / "voxplain-bench-1mm"
    subject = subject_folder(work / "cohort")
    case = brats_sized_case(subject, size, work)
    print(f"subject {subject.name} (1 mm phantom, MNI grid 197x233x189) cropped/padded around the brain to {size}; "
          f"torch threads {torch.get_num_threads()}; load average before: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.path == "bundle":
        run_bundle(args, case, work)
    else:
        print(f"{args.path}: RegionUNet ({'weights ' + args.weights if args.weights else 'random weights'}), roi "
              f"{args.roi}^3, overlap 0.5, gaussian, sw_batch_size {args.sw_batch_size}, target WT logit over "
              f"{'the ground-truth tumour' if args.region == 'wt' else 'all voxels'}, memory_budget {args.budget_gb} GB")
        print(f"{'method':<9} {'windows':>7} {'calls':>6} {'seconds':>9} {'RSS before':>10} {'peak RSS':>10} "
              f"{'added':>8} {'budget':>9}  notes   (added = peak - before: what explain_detailed took)")
        for method in args.only:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--case", str(case), "--path",
                   args.path, "--steps", str(args.steps), "--roi", str(args.roi), "--region", args.region,
                   "--sw-batch-size", str(args.sw_batch_size), "--budget-gb", str(args.budget_gb)]
            if args.weights:
                cmd += ["--weights", args.weights]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method:<9} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak_gb, before_gb = r["peak_kb"] / 1024**2, r["before_kb"] / 1024**2
            added_gb = peak_gb - before_gb
            notes = {k: v for k, v in r.items() if k in ("steps", "completeness_error")}
            print(f"{method:<9} {r['windows']:>7} {r['model_calls']:>6} {r['seconds']:>9.1f} "
                  f"{before_gb:>8.2f}GB {peak_gb:>8.2f}GB {added_gb:>6.2f}GB "
                  f"{'holds' if added_gb <= args.budget_gb else 'EXCEEDED':>9}  {json.dumps(notes)}")
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
