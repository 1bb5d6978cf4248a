"""Benchmark of CXAI stage 1: the default 36-configuration sweep on phantom slices.

Goal (issue 7): the 3 x 4 x 3 grid on phantom axial slices (64x64, a few thousand
images, 5 epochs) finishes within 20 minutes on 2 CPU cores with ``--workers 2``,
and the best configuration reaches >= 0.95 validation accuracy.

    python benchmarks/bench_sweep.py --out /tmp/bench-sweep [--subjects 40] [--epochs 5]

Prints the wall time, the number of images, the best configuration and a
per-configuration table read back from ``trials.csv``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/voxplain-bench-sweep"))
    parser.add_argument("--subjects", type=int, default=40, help="phantom subjects (2 mm) to slice")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    cohort = args.out / "cohort"
    if not (cohort / "subjects.csv").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "voxplain", "phantom", "--out", str(cohort), "--subjects",
                        str(args.subjects), "--seed", "7", "--resolution", "2", "--healthy-fraction", "0.2",
                        "--quiet"], check=True)
        print(f"phantom cohort: {args.subjects} subjects in {time.perf_counter() - start:.1f} s")
    sweep = args.out / "sweep"
    cmd = [sys.executable, "-m", "voxplain", "sweep", "--data", str(cohort), "--out", str(sweep),
           "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--workers", str(args.workers),
           "--quiet"]
    print("running:", " ".join(cmd[1:]))
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    with open(sweep / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    import torch

    data = torch.load(sweep / "sweep-data.pt", weights_only=True)
    n_train, n_val = len(data["train_y"]), len(data["val_y"])
    best = max(rows, key=lambda r: float(r["best_val_accuracy"]))
    print(f"\n{len(rows)} configurations, {n_train} training + {n_val} validation images "
          f"({args.image_size}x{args.image_size}), {args.epochs} epochs, {args.workers} workers")
    print(f"wall time: {wall / 60:.1f} min (goal <= 20 min)")
    print(f"best: {best['config']} best validation accuracy {float(best['best_val_accuracy']):.4f} "
          f"(goal >= 0.95)\n")
    print(f"{'config':<22}{'best val':>10}{'final val':>11}{'seconds':>9}")
    for r in rows:
        print(f"{r['config']:<22}{float(r['best_val_accuracy']):>10.4f}{float(r['final_val_accuracy']):>11.4f}"
              f"{float(r['seconds']):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
