"""Scores of trained checkpoints on held-out phantom subjects (not a test; reads or recomputes).

``voxplain train --test-data DIR`` scores the kept model once on a test cohort and
writes the scores to the checkpoint's config.json (``test_metrics``). This script
prints those scores as the table of ``src/voxplain/assets/models/README.md`` (test
set sizes, Dice over the cases that have each region and the empty cases apart,
training time, CPU time and load, model size), and adds:

* the prediction on the demo's subject (``generate_cohort(subjects=1, seed=0,
  resolution=3)``, what ``voxplain demo`` explains) for 3D classifiers;
* with ``--test DIR``: the scores recomputed from the weights on that cohort, so
  the numbers in config.json can be checked (or measured on another cohort).

Issue-11 targets: grade accuracy >= 0.95 on >= 40 test subjects and the demo
subject right; U-Net Dice WT >= 0.90, TC >= 0.80, ET >= 0.80 over the test cases
with the region; slice CNN accuracy >= 0.97; all checkpoints <= 5 MB together.

    python benchmarks/bench_models.py build/demo-models/demo-grade build/demo-models/demo-unet
    python benchmarks/bench_models.py --test build/demo-models/test src/voxplain/assets/models/demo-*
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from voxplain.models.checkpoint import load_checkpoint
from voxplain.models.scores import heldout_scores
from voxplain.models.training_data import InMemoryDataset

TARGETS = {"demo-grade": {"accuracy": 0.95}, "demo-slices": {"accuracy": 0.97},
           "demo-unet": {"WT": 0.90, "TC": 0.80, "ET": 0.80}}
SIZE_LIMIT_MB = 5.0


def folder_mb(path: Path) -> float:
    """Size of a checkpoint's weights file in MB."""
    return (path / "model.pt").stat().st_size / 1e6


def demo_subject_prediction(model, config: dict) -> dict:
    """The classifier's output on the demo's subject, prepared like its training data."""
    from voxplain.data.brats import find_brats_cases, load_brats_case, read_subjects_table
    from voxplain.data.phantom import generate_cohort
    from voxplain.data.preprocess import crop_or_pad, foreground_centre, zscore_nonzero

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "demo"
        generate_cohort(root, subjects=1, seed=0, resolution=3)
        case = load_brats_case(find_brats_cases(root)[0])
        truth = read_subjects_table(root)[case.name]["grade"]
    image = crop_or_pad(zscore_nonzero(case.image), config["input_size"], centre=foreground_centre(case.image))
    with torch.no_grad():
        prob = torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[0]
    names = config.get("class_names") or [str(i) for i in range(len(prob))]
    predicted = names[int(prob.argmax())]
    return {"subject": case.name, "true": truth, "predicted": predicted, "correct": predicted == truth,
            "probabilities": {n: round(float(p), 4) for n, p in zip(names, prob)}}


def recompute(model, config: dict, cohort: Path) -> dict:
    """Test scores of ``model`` on ``cohort``, loaded like the checkpoint's training data."""
    from voxplain.models.training_data import TrainingData, load_heldout_items

    slices = config["data"]["kind"] == "cohort-slices"
    like = TrainingData(train=InMemoryDataset([]), val=None, kind=config["data"]["kind"],
                        input_size=tuple(config["input_size"]), channel_names=config["channel_names"],
                        class_names=config.get("class_names"), preprocessing=config.get("preprocessing", {}))
    items = load_heldout_items(cohort, config["task"], slices, like, progress=False)
    regions = {"region_names": config["region_names"]} if config.get("region_names") else {}
    return heldout_scores(model, InMemoryDataset(items), config["task"], class_names=config.get("class_names"),
                          **regions)


def headline(scores: dict) -> str:
    """One cell: accuracy (n) or Dice per region (cases with it) plus the empty cases left empty."""
    if "accuracy" in scores:
        per = ", ".join(f"{k} {v['accuracy']:.3f} ({v['n']})" for k, v in scores["per_class"].items()
                        if v["accuracy"] is not None)
        return f"accuracy {scores['accuracy']:.4f} on {scores['n']} ({per})"
    dice = ", ".join(f"{r} {v['mean']:.4f} ({v['cases']})" for r, v in scores["dice"].items() if v["mean"] is not None)
    empty = ", ".join(f"{r} {v['predicted_empty']}/{v['cases']}" for r, v in scores["empty"].items() if v["cases"])
    return f"Dice {dice}; empty cases predicted empty: {empty or 'none'}"


def passed(name: str, scores: dict) -> bool | None:
    """Whether ``scores`` meet the issue-11 target of the demo model ``name`` (None: no target)."""
    target = TARGETS.get(name)
    if target is None or not scores:
        return None
    if "accuracy" in target:
        return scores["accuracy"] >= target["accuracy"]
    return all((scores["dice"][r]["mean"] or 0) >= v for r, v in target.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders")
    parser.add_argument("--test", metavar="DIR", help="recompute the test scores on this cohort")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, total_mb = {}, 0.0
    for folder in map(Path, args.checkpoints):
        model, config = load_checkpoint(folder)
        name = folder.name
        training = config.get("training", {})
        data = config.get("data", {})
        row = {"model": config.get("model"), "model_config": config.get("model_config"), "mb": round(folder_mb(folder), 3),
               "parameters": sum(p.numel() for p in model.parameters()),
               "train": data.get("train"), "val": data.get("val"), "test": data.get("test"),
               "kept_epoch": config.get("metrics", {}).get("epoch"), "epochs": training.get("epochs"),
               "wall_seconds": training.get("wall_seconds"), "cpu_seconds": training.get("cpu_seconds"),
               "threads": training.get("threads"), "load_average": training.get("load_average"),
               "test_metrics": config.get("test_metrics")}
        total_mb += row["mb"]
        if args.test:
            row["recomputed"] = recompute(model, config, Path(args.test))
        if config.get("task") == "classify" and len(config.get("input_size", [])) == 3:
            row["demo_subject"] = demo_subject_prediction(model, config)
        row["passed"] = passed(name, row.get("recomputed") or row["test_metrics"] or {})
        results[name] = row
        print(f"\n## {name}: {row['model']} {json.dumps(row['model_config'])}, {row['parameters']} parameters, "
              f"{row['mb']:.2f} MB")
        for part in ("train", "val", "test"):
            rec = row[part] if isinstance(row[part], dict) else {"samples": row[part]}  # older configs: a count
            print(f"  {part:5s}: {rec.get('samples')} samples from {rec.get('path', rec.get('from'))}"
                  + (f" (phantom seed {rec['seed']}, {rec['subjects']} subjects)" if "seed" in rec else ""))
        print(f"  training: epoch {row['kept_epoch']} of {row['epochs']} kept; {row['wall_seconds']} s wall, "
              f"{row['cpu_seconds']} s CPU, {row['threads']} threads, load average {row['load_average']}")
        if row["test_metrics"]:
            print(f"  test (config.json): {headline(row['test_metrics'])}")
        if "recomputed" in row:
            print(f"  test (recomputed on {args.test}): {headline(row['recomputed'])}")
        if "demo_subject" in row:
            d = row["demo_subject"]
            print(f"  demo subject {d['subject']}: true {d['true']}, predicted {d['predicted']} {d['probabilities']}")
        print(f"  issue-11 target met: {row['passed']}")
    print(f"\nall checkpoints: {total_mb:.2f} MB (limit {SIZE_LIMIT_MB} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "total_mb": total_mb}, indent=2) + "\n")


if __name__ == "__main__":
    main()
