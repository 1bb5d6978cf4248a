"""Quality benchmark of the model zoo on a phantom cohort (not a test; slow).

Targets (issue 4), on a phantom cohort at 2 or 3 mm with 20% of subjects held out,
on 2 CPU cores: 3D U-Net Dice WT >= 0.85 and ET >= 0.7 within 15 minutes of
training; grade classifier (HGG vs LGG) accuracy >= 0.9; 2D tumour / no-tumour
slice CNN accuracy >= 0.95. Each model is trained with the settings of the
matching ``voxplain train --preset`` and its held-out metrics are printed and
written to ``OUT/bench_models.json``.

    python benchmarks/bench_models.py --cohort /tmp/cohort3 --out /tmp/bench_models
    python benchmarks/bench_models.py --only unet --minutes 15
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from voxplain.cli.train import PRESETS
from voxplain.models import build_model, save_checkpoint, train
from voxplain.models.curves import plot_history
from voxplain.models.training_data import augment_training_set, load_training_data

TARGETS = {"unet": {"val_dice_WT": 0.85, "val_dice_ET": 0.7}, "grade": {"val_accuracy": 0.9},
           "slices": {"val_accuracy": 0.95}}


def clock() -> float:
    """Training time as on a dedicated machine with ``THREADS`` cores: this process's CPU time / THREADS.

    The benchmark machine is shared with other work, so wall time says little;
    CPU time divided by the thread count is what the same run would take alone.
    """
    return time.process_time() / THREADS


THREADS = 2


def dice_where_present(model, dataset, region_names) -> dict:
    """Mean Dice per region over the validation cases that have that region (no empty-empty 1s)."""
    from voxplain.models.training import dice_per_case

    model.eval()
    scores = {r: [] for r in region_names}
    with torch.no_grad():
        for x, y in dataset:
            d = dice_per_case(model(x[None]) > 0, y[None] > 0.5)[0]
            for r, value, present in zip(region_names, d.tolist(), (y.flatten(1).sum(1) > 0).tolist()):
                if present:
                    scores[r].append(value)
    return {r: round(sum(v) / len(v), 4) if v else None for r, v in scores.items()}


def run_one(key: str, cohort: Path, out: Path, minutes: float, epochs: int | None, progress: bool,
            overrides: dict | None = None) -> dict:
    preset = dict(PRESETS[f"demo-{key}"], **(overrides or {}))
    task = preset["task"]
    data = load_training_data(cohort, task=task, slices=preset.get("slices", False), size=preset.get("size"),
                              resolution=preset.get("resolution"), val_fraction=0.2, seed=preset["seed"],
                              progress=progress)
    data = augment_training_set(data, preset.get("patch"), preset.get("patches_per_case", 2),
                                bool(preset.get("flip")), seed=preset["seed"])
    config = dict(preset.get("model_config", {}))
    if preset["model"] == "unet3d":
        config.update(in_channels=data.channels, out_channels=len(data.region_names))
    else:
        config.update(in_channels=data.channels, num_classes=len(data.class_names),
                      image_size=list(data.input_size))
        if "blocks" in preset:
            config["blocks"] = preset["blocks"]
    torch.manual_seed(preset["seed"])
    model = build_model(preset["model"], **config)
    (out / key).mkdir(parents=True, exist_ok=True)
    log = out / f"{key}_epochs.jsonl"
    log.write_text("")

    def on_epoch_end(record: dict) -> None:
        record["cpu_seconds_per_thread"] = round(clock() - cpu_start, 1)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    start, cpu_start = time.perf_counter(), clock()
    history = train(model, data.train, data.val, task=task, epochs=epochs or preset["epochs"],
                    batch_size=preset["batch_size"], lr=preset["lr"], seed=preset["seed"], progress=progress,
                    keep="best", region_names=data.region_names or ("TC", "WT", "ET"),
                    time_limit=minutes * 60 if minutes else None, clock=clock, on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start
    kept = next(r for r in history if r["kept"])
    save_checkpoint(model, {"task": task, "benchmark": key}, out / key, history=history)
    plot_history(history, out / key / "learning_curve.png", title=f"bench {key}")
    result = {"settings": preset, "train_items": len(data.train), "val_items": len(data.val), "input_size": list(data.input_size),
              "epochs_run": len(history), "wall_seconds": round(seconds, 1),
              "cpu_seconds_per_thread": round(clock() - cpu_start, 1), "kept_epoch": kept["epoch"],
              "first_epoch": {k: round(v, 4) for k, v in history[0].items() if k.startswith("val_")},
              "kept": {k: round(v, 4) for k, v in kept.items() if k.startswith("val_")}}
    if task == "segment":
        result["val_dice_present"] = dice_where_present(model, data.val, data.region_names)
    result["passed"] = all(kept.get(k, 0) >= v for k, v in TARGETS[key].items())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", default="/tmp/voxplain_bench_cohort3", help="cohort folder (made if missing)")
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=3)
    parser.add_argument("--out", default="/tmp/voxplain_bench_models")
    parser.add_argument("--only", choices=sorted(TARGETS), action="append", help="run only these parts")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time limit per model")
    parser.add_argument("--epochs", type=int, help="override the presets' epoch counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a preset setting, e.g. --set patch='\"32\"' --set lr=0.003")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    cohort, out = Path(args.cohort), Path(args.out)
    if not cohort.exists():
        from voxplain.data.phantom import generate_cohort

        generate_cohort(cohort, subjects=args.subjects, seed=0, resolution=args.resolution, progress=not args.quiet)
    results = {}
    for key in args.only or list(TARGETS):
        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        results[key] = run_one(key, cohort, out, args.minutes, args.epochs, not args.quiet, overrides)
        print(key, json.dumps(results[key]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_models.json").write_text(json.dumps({"cohort": str(cohort), "threads": args.threads,
                                                       "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
