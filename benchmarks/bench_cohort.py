"""Benchmark of cohort explanation on Dask (issue 15): 1 vs 2 workers, and what Dask adds per case.

For each model, the same phantom cohort is explained three ways, each into a fresh
folder, as the CLI runs it (a subprocess each, so imports and model loading count):

1. the single-process loop: ``voxplain explain --input COHORT``;
2. ``--workers 1``: a local Dask cluster of one worker process;
3. ``--workers 2``: two worker processes, the cores split between them.

Printed per model: the three wall times, the 1-worker / 2-worker ratio, and the
per-case overhead of Dask, ``(wall(--workers 1) - wall(loop)) / cases``, shown with
and without the cluster's start-up (a one-worker ``LocalCluster`` that imports
voxplain on its worker, started and closed on its own; it is paid once per run).
The machine's load average is printed before and after: on shared cores the numbers
move with it.

    python benchmarks/bench_cohort.py                                  # the issue: 16 cases, default methods
    python benchmarks/bench_cohort.py --cases 4 --models demo-grade --methods vanilla_gradient,gradcam
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False)  # a cohort with failed cases exits 1; the count is checked below
    return time.perf_counter() - start


def _cluster_start() -> float:
    """Seconds to start a one-worker local cluster whose worker imports voxplain and torch, and close it."""
    code = ("import time, logging\n"
            "t = time.perf_counter()\n"
            "from distributed import Client, LocalCluster\n"
            "with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,"
            " dashboard_address=':0') as c, Client(c) as client:\n"
            "    client.submit(lambda: __import__('voxplain.report.pipeline') and 0, pure=False).result()\n"
            "print(time.perf_counter() - t)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def _cases_done(out: Path) -> int:
    return sum(1 for p in out.glob("*/summary.json"))


def _method_seconds(out: Path) -> float:
    """The explanation time every case's summary.json records (all targets and methods), summed over cases."""
    total = 0.0
    for path in out.glob("*/summary.json"):
        for study in json.loads(path.read_text()).get("studies", []):
            for target in study.get("settings", {}).get("targets", {}).values():
                total += sum(m.get("seconds", 0.0) for m in target.get("methods", {}).values())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/voxplain-bench-cohort"))
    parser.add_argument("--cases", type=int, default=16, help="phantom cases (3 mm)")
    parser.add_argument("--models", default="demo-grade,demo-unet", help="comma-separated --model values")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: explain's default)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    voxplain = [sys.executable, "-m", "voxplain"]
    cohort = args.out / f"cohort-{args.cases}"
    if not (cohort / "subjects.csv").is_file():
        subprocess.run(voxplain + ["phantom", "--out", str(cohort), "--subjects", str(args.cases), "--seed", "11",
                                   "--resolution", "3", "--quiet"], check=True)
    print(f"load average before: {_load()} (1, 5, 15 min); {os.cpu_count()} cores")
    start_s = _cluster_start()
    print(f"one-worker local cluster start + close (worker imports voxplain): {start_s:.1f} s")
    results = []
    for model in args.models.split(","):
        extra = ["--quiet"] + (["--methods", args.methods] if args.methods else [])
        for opt in args.option:
            extra += ["--option", opt]
        walls, computing = {}, {}
        for label, flags in (("loop", []), ("1 worker", ["--workers", "1"]), ("2 workers", ["--workers", "2"])):
            out = args.out / "runs" / f"{model}-{label.replace(' ', '')}"
            shutil.rmtree(out, ignore_errors=True)
            walls[label] = _run(voxplain + ["explain", "--model", model, "--input", str(cohort), "--out", str(out),
                                            *extra, *flags])
            done = _cases_done(out)
            computing[label] = _method_seconds(out)
            print(f"{model:<12} {label:<10} {walls[label]:8.1f} s  ({done}/{args.cases} cases; methods "
                  f"{computing[label]:.1f} s, the rest {(walls[label] - computing[label]) / args.cases:.2f} s per case)"
                  f"  load {_load()}")
            if done != args.cases:
                print(f"  {args.cases - done} cases missing: see {out}/failures.csv", file=sys.stderr)
        per_case = (walls["1 worker"] - walls["loop"]) / args.cases
        # the same, on the time outside the methods: robust to the methods running slower in one run (load)
        rest = {k: (walls[k] - computing[k]) / args.cases for k in walls}
        row = {"model": model, "cases": args.cases, "methods": args.methods or "default", "wall_s": walls,
               "method_s": computing, "outside_methods_per_case_s": rest,
               "dask_overhead_outside_methods_per_case_s": rest["1 worker"] - rest["loop"],
               "ratio_1_over_2_workers": walls["1 worker"] / walls["2 workers"],
               "dask_overhead_per_case_s": per_case,
               "dask_overhead_per_case_without_start_s": per_case - start_s / args.cases}
        results.append(row)
        print(f"{model:<12} 1 worker / 2 workers = {row['ratio_1_over_2_workers']:.2f}x;  Dask adds "
              f"{per_case:+.2f} s per case ({row['dask_overhead_per_case_without_start_s']:+.2f} s without the "
              f"cluster start); outside the methods {row['dask_overhead_outside_methods_per_case_s']:+.2f} s per case")
    print(f"load average after: {_load()}")
    if args.json:
        args.json.write_text(json.dumps({"cluster_start_s": start_s, "results": results, "load_after": _load()},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
