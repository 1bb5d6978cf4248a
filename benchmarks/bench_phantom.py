"""Benchmark of the synthetic cohort: generation speed, loading speed, and how learnable it is.

Not a test. Prints:

* generation time of a cohort (wall and CPU seconds per subject) at each resolution asked;
* loading time of the cohort through ``BratsCohortDataset`` and ``SliceDataset``;
* what simple intensity thresholds reach (WT / ET Dice, grade accuracy): a floor
  that trained models should beat clearly, and a check that the task is not trivial;
* with ``--quality``: trains the three demo presets of ``voxplain train`` (3D U-Net,
  grade classifier, 2D slice CNN) on a 3 mm cohort and prints the best validation
  metrics and those of epoch 1 from each ``history.json``. The issue's goals on
  2 CPU cores: U-Net Dice WT >= 0.85 and ET >= 0.7 within 15 minutes, grade
  accuracy >= 0.9, slice accuracy >= 0.95 but not 1.0 at epoch 1.

Usage::

    python benchmarks/bench_phantom.py                     # 10 subjects at 2 mm and 3 mm
    python benchmarks/bench_phantom.py --subjects 60 --resolutions 3
    python benchmarks/bench_phantom.py --quality --subjects 60 --out /tmp/phantom-bench
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


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_generation(out: Path, subjects: int, resolutions, workers: int) -> dict[int, Path]:
    from voxplain.data.phantom import generate_cohort
    from voxplain.data.template import load_template

    cohorts = {}
    for r in resolutions:
        _, t_wall, _ = _timed(lambda: load_template(r))
        folder = out / f"cohort_{r}mm"
        _, wall, cpu = _timed(lambda: generate_cohort(folder, subjects=subjects, seed=0, resolution=r,
                                                      workers=workers))
        print(f"generate {subjects:3d} subjects at {r} mm: {wall:6.1f} s wall ({wall / subjects:.2f} s/subject), "
              f"{cpu:6.1f} s CPU in this process; template {t_wall:.1f} s (once per process)")
        cohorts[r] = folder
    return cohorts


def bench_loading(folder: Path) -> None:
    from voxplain.data.datasets import BratsCohortDataset, SliceDataset

    ds, wall, _ = _timed(lambda: BratsCohortDataset(folder, task="segment", cache=False))
    _, read, _ = _timed(lambda: [ds[i] for i in range(len(ds))])
    print(f"BratsCohortDataset(segment): {len(ds)} cases, {read / len(ds):.2f} s per case "
          f"(load + z-score + crop), input {tuple(ds[0][0].shape)}")
    sl, wall, _ = _timed(lambda: SliceDataset(folder))
    _, read, _ = _timed(lambda: [sl[i] for i in range(len(sl))])
    print(f"SliceDataset: {len(sl)} slices ({sum(sl.labels)} tumour) indexed in {wall:.1f} s, "
          f"all read in {read:.1f} s, slice {tuple(sl[0][0].shape)}")


def bench_baselines(folder: Path) -> None:
    """How far simple intensity rules get (a trained model should beat them clearly)."""
    import numpy as np

    from voxplain.data.datasets import BratsCohortDataset
    from voxplain.data.preprocess import REGIONS

    ds = BratsCohortDataset(folder, task="segment", cache=False)
    pairs = [(x.numpy(), y.numpy() > 0.5) for x, y in (ds[i] for i in range(len(ds)))]
    flair, t1ce = ds.modalities.index("flair"), ds.modalities.index("t1ce")
    wt, et = REGIONS.index("WT"), REGIONS.index("ET")

    def dice(p, t):
        s = p.sum() + t.sum()
        return 1.0 if s == 0 else 2.0 * (p & t).sum() / s

    best_wt = max((np.mean([dice(x[flair] > a, y[wt]) for x, y in pairs]), a) for a in (1.0, 1.5, 2.0, 2.5, 3.0))
    with_et = [(x, y) for x, y in pairs if y[et].any()]
    best_et = max((np.mean([dice((x[t1ce] > b) & (x[flair] > 1.0), y[et]) for x, y in with_et]), b)
                  for b in (2.0, 2.5, 3.0, 3.5))
    print(f"baseline rules (best threshold on the whole cohort): WT Dice {best_wt[0]:.3f} (flair z > {best_wt[1]}), "
          f"ET Dice {best_et[0]:.3f} on cases with ET (t1ce z > {best_et[1]} inside flair z > 1)")
    tumour = [(x, y) for x, y in pairs if y[wt].any()]
    if tumour:
        hgg = np.array([y[et].any() for _, y in tumour])
        for b in (2.5, 3.0):
            f = np.array([((x[t1ce] > b) & (x[flair] > 1.0)).sum() for x, _ in tumour])
            acc = max(((f > t) == hgg).mean() for t in np.unique(f))
            print(f"baseline grade rule: count of t1ce z > {b} voxels inside flair z > 1, best cut: accuracy {acc:.3f}")


def bench_quality(folder: Path, out: Path) -> None:
    keys = {"demo-unet": ("val_dice_WT", "val_dice_ET", "val_dice_TC"),
            "demo-grade": ("val_accuracy",), "demo-slices": ("val_accuracy",)}
    for preset, metrics in keys.items():
        dest = out / preset
        cmd = [sys.executable, "-m", "voxplain", "train", "--preset", preset, "--data", str(folder),
               "--out", str(dest), "--quiet"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        if done.returncode != 0:
            print(f"{preset}: failed ({done.stderr.strip().splitlines()[-1:]})")
            continue
        history = json.loads((dest / "history.json").read_text())
        epochs = history if isinstance(history, list) else history.get("epochs", history)
        best = {m: max(e.get(m, float("nan")) for e in epochs) for m in metrics}
        first = {m: epochs[0].get(m, float("nan")) for m in metrics}
        print(f"{preset}: {len(epochs)} epochs in {minutes:.1f} min; best "
              + ", ".join(f"{m}={v:.3f}" for m, v in best.items())
              + "; epoch 1 " + ", ".join(f"{m}={v:.3f}" for m, v in first.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--quality", action="store_true", help="also train the demo presets on the 3 mm cohort")
    args = parser.parse_args(argv)
    print(f"CPU cores: {os.cpu_count()}, torch threads: {__import__('torch').get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        cohorts = bench_generation(out, args.subjects, args.resolutions, args.workers)
        bench_loading(cohorts[max(cohorts)])
        bench_baselines(cohorts[max(cohorts)])
        if args.quality:
            if 3 not in cohorts:
                cohorts.update(bench_generation(out, args.subjects, [3], args.workers))
            bench_quality(cohorts[3], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
