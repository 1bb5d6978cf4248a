"""Do the shipped U-Net's maps point at the tumour? Whole-volume pooling (before) vs predicted-region pooling (after).

Two measurements (issue 10's "Done when"), both through the command line as a user runs it:

1. ``mass``: ``voxplain explain`` on one phantom subject, default method options, target WT,
   ``--region all`` (NeuroXAI's whole-volume pooling: what main did before) and
   ``--region predicted`` (the default now). For vanilla gradient, integrated gradients,
   Guided IG, SmoothGrad and Grad-CAM it prints the relevance mass inside the true WT
   (share of sum |map| over channels) divided by the WT volume fraction, both on the
   model's input grid (the crop the model saw). 1 = no better than spreading relevance
   evenly; the goal is >= 3.
2. ``evaluate``: ``voxplain evaluate`` on held-out phantom subjects (a seed not used in
   training), region WT, ``--pool all`` vs ``--pool predicted``: the method x metric tables.

The phantom cohort is generated if ``--cohort`` does not exist yet. Rerun after the demo
models are retrained (``--model`` to point elsewhere). Examples::

    python benchmarks/bench_region_targets.py --part mass --out /tmp/bench-regions
    python benchmarks/bench_region_targets.py --part evaluate --cases 20 --out /tmp/bench-regions
    python benchmarks/bench_region_targets.py --part evaluate --cases 20 --fast --out /tmp/bench-regions

``--fast`` passes fewer path steps to ``evaluate`` (IG 16, Guided IG 32, SmoothGrad 8 samples,
XRAI 16, Blur IG 16); the table printed says which options ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MASS_METHODS = ("vanilla_gradient", "integrated_gradients", "guided_ig", "smoothgrad", "gradcam")
FAST_OPTIONS = ("integrated_gradients.steps=16", "guided_ig.steps=32", "smoothgrad.samples=8", "xrai.steps=16",
                "blur_ig.steps=16")
TABLE_METRICS = ("WT_relevance_mass", "WT_relevance_rank", "WT_roc_auc", "WT_pointing_game", "deletion_auc",
                 "insertion_auc", "sic_auc", "sparseness", "randomisation_ssim")


def _voxplain() -> list[str]:
    return [sys.executable, "-m", "voxplain"]


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def ensure_cohort(cohort: Path, subjects: int, seed: int) -> None:
    """Generate the held-out phantom cohort unless it is there."""
    if (cohort / "subjects.csv").is_file():
        return
    _run(_voxplain() + ["phantom", "--out", str(cohort), "--subjects", str(subjects), "--seed", str(seed),
                        "--resolution", "3", "--quiet"])


def mass_ratios(out: Path, case_dir: Path, model: Path, methods=MASS_METHODS) -> dict[str, float]:
    """Relevance mass in the true WT / WT volume fraction, per method, on the model's input grid."""
    from voxplain.data.brats import load_brats_case
    from voxplain.data.nifti import load_nifti
    from voxplain.data.preprocess import crop_or_pad, foreground_centre
    from voxplain.evaluate.localisation import relevance_mass

    config = json.loads((model / "config.json").read_text())
    case = load_brats_case(case_dir)
    _, box = crop_or_pad(case.image, config["input_size"], centre=foreground_centre(case.image), return_box=True)
    wt = box.apply(case.seg) > 0
    fraction = wt.sum() / wt.size
    ratios = {}
    for m in methods:
        data, _ = load_nifti(out / "maps" / f"WT_{m}.nii.gz", channels_from_4d=True)
        data = data if data.ndim == 4 else data[None]
        mass = float(relevance_mass(box.apply(data)[None], wt[None])[0])
        ratios[m] = mass / fraction
    return ratios


def run_mass(args) -> dict:
    case_dir = args.cohort / args.subject
    results = {}
    for region in ("all", "predicted"):
        out = args.out / f"explain_{args.subject}_{region}"
        seconds = _run(_voxplain() + ["explain", "--model", str(args.model), "--input", str(case_dir),
                                      "--target", "WT", "--methods", ",".join(MASS_METHODS), "--region", region,
                                      "--out", str(out), "--quiet"])
        results[region] = {"seconds": round(seconds, 1), "ratio": mass_ratios(out, case_dir, args.model)}
    print(f"\nWT relevance mass / WT volume fraction, {args.subject} (goal >= 3)")
    print("method".ljust(24) + "before (--region all)".rjust(24) + "after (--region predicted)".rjust(28))
    for m in MASS_METHODS:
        print(m.ljust(24) + f"{results['all']['ratio'][m]:24.2f}" + f"{results['predicted']['ratio'][m]:28.2f}")
    return results


def run_evaluate(args) -> dict:
    results = {}
    options = [a for o in (FAST_OPTIONS if args.fast else ()) for a in ("--option", o)]
    for pool in args.pools:
        out = args.out / f"evaluate_{pool}"
        seconds = _run(_voxplain() + ["evaluate", "--model", str(args.model), "--data", str(args.cohort),
                                      "--region", "WT", "--pool", pool, "--cases", str(args.cases),
                                      "--randomisation-cases", str(args.randomisation_cases),
                                      "--out", str(out), "--quiet"] + options
                       + (["--metrics", args.metrics] if args.metrics else []))
        metrics = json.loads((out / "metrics.json").read_text())
        per_case = json.loads((out / "metrics_per_case.json").read_text())
        results[pool] = {"seconds": round(seconds, 1), "metrics": metrics,
                         "skipped": per_case["settings"].get("skipped_cases", {}), "cases": per_case["cases"]}
    print(f"\nvoxplain evaluate, {args.cases} held-out subjects, WT, metrics {args.metrics or 'all'}, "
          f"randomisation on {args.randomisation_cases} case(s)"
          + (f", options {' '.join(FAST_OPTIONS)}" if args.fast else ", default options"))
    for pool, label in (("all", "before: --pool all (whole volume)"), ("predicted", "after: --pool predicted")):
        if pool not in results:
            continue
        r = results[pool]
        print(f"\n{label}; {r['seconds']:.0f} s; skipped: {r['skipped'] or 'none'}")
        print("| method | " + " | ".join(TABLE_METRICS) + " |")
        print("|---" * (len(TABLE_METRICS) + 1) + "|")
        for m, values in r["metrics"].items():
            cells = [values.get(k) for k in TABLE_METRICS]
            print(f"| {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return results


def main(argv=None) -> int:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["mass", "evaluate", "both"], default="both")
    p.add_argument("--model", type=Path, default=here / "src/voxplain/assets/models/demo-unet")
    p.add_argument("--cohort", type=Path, default=Path("/tmp/voxplain-heldout-101"),
                   help="held-out phantom cohort (generated if missing)")
    p.add_argument("--seed", type=int, default=101, help="phantom seed of a generated cohort (not used in training)")
    p.add_argument("--subjects", type=int, default=24, help="subjects of a generated cohort")
    p.add_argument("--subject", default="PHANTOM_002", help="subject of the relevance-mass measurement")
    p.add_argument("--cases", type=int, default=20, help="subjects evaluated")
    p.add_argument("--fast", action="store_true", help="fewer path steps in evaluate (see the docstring)")
    p.add_argument("--randomisation-cases", type=int, default=1,
                   help="cases that get evaluate's cascading randomisation (default 1, as evaluate; each costs "
                        "one full explanation per layer with parameters, ~40 on the demo U-Net)")
    p.add_argument("--metrics", help="metric families passed to evaluate (default: all; PIC is the costliest)")
    p.add_argument("--pools", nargs="+", choices=["all", "predicted"], default=["all", "predicted"],
                   help="evaluate only these poolings (e.g. to run before and after in two processes)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_cohort(args.cohort, max(args.subjects, args.cases), args.seed)
    load = os.getloadavg()
    results = {"model": str(args.model), "cohort": str(args.cohort), "load_average": load}
    if args.part in ("mass", "both"):
        results["mass"] = run_mass(args)
    if args.part in ("evaluate", "both"):
        results["evaluate"] = run_evaluate(args)
    results["load_average_end"] = os.getloadavg()
    (args.out / f"results_{args.part}_{'_'.join(args.pools)}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nload average at start {load}, at end {results['load_average_end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
