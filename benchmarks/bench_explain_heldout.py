"""The shipped demo models on a phantom cohort they never saw, measured through ``voxplain explain``.

Issue 11's acceptance check: generate a phantom cohort with a seed used neither in
training, validation nor test (``make demo-models`` uses seeds 1, 2 and 3), run the
command a user runs on a folder of cases, and read the predictions back from the
report's ``summary.json`` files:

* ``voxplain explain --model demo-grade --input COHORT`` (Grad-CAM only, it is the
  prediction that is measured): accuracy of the predicted grade against the cohort's
  ``subjects.csv`` (``agrees_with_case_label`` in each summary); goal >= 0.93;
* ``voxplain explain --model demo-unet --input COHORT --target WT``: the Dice of the
  predicted label map with the case's segmentation per region (``prediction.regions``),
  averaged over the cases that have the region; goal WT >= 0.88. Cases without a region
  in the ground truth are counted apart (how many the model leaves empty).

    python benchmarks/bench_explain_heldout.py --subjects 40 --seed 7 --out /tmp/heldout7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GOALS = {"grade accuracy": 0.93, "WT Dice": 0.88}


def _voxplain(*args: str) -> float:
    cmd = [sys.executable, "-m", "voxplain", *args]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text())["studies"][0] for p in sorted(out.glob("*/summary.json"))]


def grade_accuracy(out: Path) -> dict:
    """Share of cases whose predicted grade agrees with the cohort table."""
    studies = _summaries(out)
    verdicts = [s["prediction"].get("agrees_with_case_label") for s in studies]
    known = [v for v in verdicts if v is not None]
    return {"cases": len(studies), "with_label": len(known), "correct": sum(known),
            "accuracy": sum(known) / len(known) if known else float("nan")}


def region_dice(out: Path) -> dict:
    """Mean Dice per region over the cases whose ground truth has it; empty-truth cases apart."""
    per_region: dict[str, dict] = {}
    for study in _summaries(out):
        for row in study["prediction"].get("regions", []):
            entry = per_region.setdefault(row["region"], {"dice": [], "empty_truth": 0, "empty_truth_predicted_empty": 0})
            if row.get("truth_voxels", 0) > 0:
                entry["dice"].append(float(row["dice"]))
            else:
                entry["empty_truth"] += 1
                entry["empty_truth_predicted_empty"] += int(row.get("predicted_voxels", 0) == 0)
    return {r: {"cases": len(e["dice"]), "mean_dice": sum(e["dice"]) / len(e["dice"]) if e["dice"] else float("nan"),
                "min_dice": min(e["dice"]) if e["dice"] else float("nan"), "empty_truth": e["empty_truth"],
                "empty_truth_predicted_empty": e["empty_truth_predicted_empty"]}
            for r, e in per_region.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--seed", type=int, default=7, help="phantom seed (make demo-models trains on 1, 2, 3)")
    p.add_argument("--out", type=Path, required=True, help="work folder (cohort and the two explain outputs)")
    p.add_argument("--grade-model", default="demo-grade")
    p.add_argument("--unet-model", default="demo-unet")
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    cohort = args.out / "cohort"
    if not (cohort / "subjects.csv").is_file():
        _voxplain("phantom", "--out", str(cohort), "--subjects", str(args.subjects), "--seed", str(args.seed),
                  "--resolution", "3", "--healthy-fraction", "0.1", "--quiet")
    seconds = {}
    seconds["grade"] = _voxplain("explain", "--model", args.grade_model, "--input", str(cohort), "--methods", "gradcam",
                                 "--out", str(args.out / "grade"), "--quiet")
    seconds["unet"] = _voxplain("explain", "--model", args.unet_model, "--input", str(cohort), "--target", "WT",
                                "--methods", "gradcam", "--out", str(args.out / "unet"), "--quiet")
    grade, dice = grade_accuracy(args.out / "grade"), region_dice(args.out / "unet")
    print(f"\nheld-out phantom cohort: {args.subjects} subjects, seed {args.seed}")
    print(f"grade ({args.grade_model}): {grade['correct']}/{grade['with_label']} correct, accuracy "
          f"{grade['accuracy']:.3f} (goal >= {GOALS['grade accuracy']}); {seconds['grade']:.0f} s")
    print(f"segmentation ({args.unet_model}), Dice over the cases with the region; {seconds['unet']:.0f} s")
    for region, r in sorted(dice.items()):
        print(f"  {region}: mean {r['mean_dice']:.3f}, min {r['min_dice']:.3f} over {r['cases']} cases; "
              f"{r['empty_truth']} without it in the ground truth, {r['empty_truth_predicted_empty']} of them "
              "predicted empty")
    print(f"goal WT Dice >= {GOALS['WT Dice']}")
    print(f"load average at start {load_start}, at end {os.getloadavg()}")
    (args.out / "heldout.json").write_text(json.dumps({"grade": grade, "dice": dice, "seconds": seconds,
                                                       "subjects": args.subjects, "seed": args.seed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
