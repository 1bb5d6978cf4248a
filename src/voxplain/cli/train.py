"""`voxplain train`: train a zoo model on a cohort or an image folder and save a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import UserError

HELP = "train a zoo model (2D CNN, 3D grade classifier, 3D U-Net) and save a checkpoint"
DESCRIPTION = """\
Train a model from the zoo and save a checkpoint folder (model.pt + config.json
that rebuilds it), history.json (loss and accuracy or Dice per epoch) and
learning_curve.png.

--data is one of
  a BraTS / phantom cohort folder (NAME/NAME_{t1,t1ce,t2,flair,seg}.nii.gz):
    --task classify   grade HGG vs LGG (subjects.csv, else enhancing tumour present)
    --task segment    ET / TC / WT region channels
    --slices          2D axial slices, tumour vs no tumour (by the mask)
  a 2D image folder with one sub-folder per class (PNG/JPEG, grey or RGB)

Validation (which epoch is kept) uses --val-data, else a seeded --val-fraction of
--data. --test-data (never used for training or choosing) is scored once at the end:
accuracy, or Dice per region over the cases that have it (empty cases apart); the
scores go to config.json ("test_metrics") with the training time and machine load.

Presets fix every training choice (model, sizes, epochs, lr, seed) for the small
pretrained models of the demo; any option given explicitly overrides the preset.
The same preset, data and seed give the same weights on the same device."""
EXAMPLES = """\
presets (the demo's small models; `make demo-models` runs exactly this):
  voxplain phantom --out train --subjects 300 --seed 1 --resolution 3 --healthy-fraction 0.1
  voxplain phantom --out val   --subjects 60  --seed 2 --resolution 3 --healthy-fraction 0.1
  voxplain phantom --out test  --subjects 100 --seed 3 --resolution 3 --healthy-fraction 0.1
  voxplain train --preset demo-unet   --data train --val-data val --test-data test --out demo-unet
  voxplain train --preset demo-grade  --data train --val-data val --test-data test --out demo-grade
  voxplain train --preset demo-slices --data train --val-data val --test-data test --out demo-slices

examples:
  voxplain train --task segment --data cohort --model unet3d_interp --epochs 20 --out runs/unet
  voxplain train --task classify --data cohort --model classifier3d --flip --shift 3 --out runs/grade
  voxplain train --task classify --data cohort --slices --model cnn2d --blocks 5 --size 64 --out runs/slices
  voxplain train --task classify --data chest_xray/train --model cnn2d --blocks 7 --size 64 --out runs/xray"""

#: the demo's small pretrained models: every training choice fixed
PRESETS: dict[str, dict] = {
    # `make demo-models` trains these on phantom cohorts at 3 mm (src/voxplain/assets/models/README.md).
    # One torch thread: a retrain repeats the weights bit for bit, and two trainings share two cores.
    # Inputs are 48x64x48 crops around the brain (the whole 3 mm brain but a few edge voxels). The
    # U-Net trains on 32^3 tumour-biased patches (about 4x less compute than whole crops).
    "demo-unet": {"task": "segment", "model": "unet3d_interp", "epochs": 30, "batch_size": 4, "lr": 3e-3,
                  "lr_schedule": "cosine", "seed": 0, "threads": 1, "size": "48,64,48", "patch": "32",
                  "patches_per_case": 2, "flip": True,
                  "model_config": {"channels": [8, 16, 32, 64], "convs": [1, 2, 2, 2]}},
    # MONAI ResNet (basic blocks 1-1-1-1, widths 8-64): on the same cohorts and settings as the zoo's
    # classifier3d (blocks 4, base width 8) both reached validation accuracy 1.0; the ResNet's validation
    # loss was lower (0.004 vs 0.016), and so was its test error (0/90 vs 2/90)
    "demo-grade": {"task": "classify", "model": "resnet3d", "epochs": 20, "batch_size": 4, "lr": 1e-3,
                   "lr_schedule": "cosine", "seed": 0, "threads": 1, "size": "48,64,48", "flip": True, "shift": 3,
                   "intensity": 0.1, "model_config": {"layers": [1, 1, 1, 1], "widths": [8, 16, 32, 64]}},
    "demo-slices": {"task": "classify", "slices": True, "model": "cnn2d", "blocks": 5, "size": "64", "epochs": 5,
                    "batch_size": 32, "lr": 1e-3, "lr_schedule": "cosine", "seed": 0, "threads": 1, "flip": True},
}

_DEFAULTS = {"task": "classify", "model": None, "blocks": None, "epochs": 10, "batch_size": 8, "lr": 1e-3, "seed": 0,
             "val_fraction": 0.2, "resolution": None, "size": None, "slices": False, "channels": 1, "keep": "best",
             "patch": None, "patches_per_case": 2, "flip": False, "shift": 0, "intensity": 0.0, "threads": None,
             "lr_schedule": "constant"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain train`."""
    parser.add_argument("--data", required=True, metavar="DIR", help="cohort folder or 2D image folder")
    parser.add_argument("--val-data", metavar="DIR",
                        help="validation folder (picks the kept epoch); default: --val-fraction of --data")
    parser.add_argument("--test-data", metavar="DIR", help="test folder, scored once after training")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fixed settings of a demo model")
    parser.add_argument("--task", choices=["classify", "segment"], help="classify (default) or segment")
    parser.add_argument("--model", metavar="NAME",
                        help="zoo model: cnn2d, classifier3d, resnet3d, unet3d_interp or unet3d "
                             "(default: cnn2d for 2D, classifier3d for 3D classes, unet3d_interp to segment)")
    parser.add_argument("--blocks", type=int, metavar="N", help="conv blocks of cnn2d / classifier3d (3, 5, 7)")
    parser.add_argument("--slices", action="store_true", default=None,
                        help="train on 2D axial slices of a cohort (tumour vs no tumour)")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="batch size (default 8)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"],
                        help="constant (default) or cosine decay to lr/20 over the epochs")
    parser.add_argument("--seed", type=int, help="seed of initialisation, split, shuffling, dropout (default 0)")
    parser.add_argument("--val-fraction", type=float, metavar="F", help="held-out fraction (default 0.2)")
    parser.add_argument("--resolution", type=int, choices=[1, 2, 3], metavar="MM",
                        help="cohort voxel size in mm; sets the default crop size")
    parser.add_argument("--size", metavar="S",
                        help="input size: one number or one per axis, e.g. 64 or 48,56,40 (crop/pad or resize)")
    parser.add_argument("--patch", metavar="S",
                        help="train on random patches of this size (fully convolutional models, the U-Nets)")
    parser.add_argument("--patches-per-case", type=int, metavar="N", help="patches per sample and epoch (default 2)")
    parser.add_argument("--flip", action="store_true", default=None, help="random left-right flips in training")
    parser.add_argument("--shift", type=int, metavar="N", help="random shifts of up to N voxels/pixels in training")
    parser.add_argument("--intensity", type=float, metavar="A",
                        help="random intensity jitter in training: scale 1+U(-A,A), offset U(-A,A) per channel")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (fix it for a retrain that repeats to the last digit)")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="image folder: 1 grey (default) or 3 RGB")
    parser.add_argument("--keep", choices=["best", "final"],
                        help="save the best validation epoch (default) or the last one")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="stop before an epoch that would end past M minutes of training")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _settings(args: argparse.Namespace) -> dict:
    """Defaults, then the preset, then the options given on the command line."""
    settings = dict(_DEFAULTS, model_config={})
    if args.preset:
        settings.update(PRESETS[args.preset])
        if args.model is not None and args.model != settings["model"]:
            settings["model_config"] = {}  # the preset's architecture options belong to its own model
    for key in _DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if settings["blocks"] is not None:
        settings["model_config"] = dict(settings["model_config"], blocks=settings["blocks"])
    if not 0 <= settings["val_fraction"] < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {settings['val_fraction']}")
    if settings["slices"] and settings["task"] != "classify":
        raise UserError("--slices trains a tumour / no-tumour classifier; it needs --task classify")
    return settings


def _check_model(name: str, task: str, slices: bool) -> None:
    from ..models import available_models
    from ..models.zoo import model_dims, model_task

    if name not in available_models():
        raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    if model_task(name) != task:
        fits = [m for m in available_models() if model_task(m) == task]
        raise UserError(f"model {name!r} does not fit task {task!r}: to {task} use {', '.join(fits)}")
    if slices and model_dims(name) != 2:
        raise UserError(f"--slices gives 2D images; model {name!r} is 3D, use cnn2d")


def _cohort_record(path: Path, n: int) -> dict:
    """Where a data folder came from: its path, sample count and, for a phantom cohort, how it was made."""
    record: dict = {"path": str(path), "samples": n}
    settings = path / "cohort.json"
    if settings.is_file():
        try:
            made = json.loads(settings.read_text())
        except (OSError, ValueError):
            made = {}
        if isinstance(made, dict):
            record.update({k: made[k] for k in ("generator", "subjects", "seed", "resolution", "grades",
                                                "healthy_fraction") if k in made})
    return record


def run(args: argparse.Namespace) -> int:
    """Load the data, train, score the test set, save checkpoint + history + learning curve."""
    import os
    import time

    import torch

    from ..atomic import check_replaceable
    from ..models import build_model, save_checkpoint, train
    from ..models.curves import plot_history
    from ..models.scores import heldout_scores
    from ..models.training_data import InMemoryDataset, augment_training_set, load_heldout_items, \
        load_training_data
    from ..models.zoo import model_dims, model_task

    settings = _settings(args)
    check_replaceable(args.out, "checkpoint")  # before training, not only when saving
    data = Path(args.data)
    for option, folder in (("--data", data), ("--val-data", args.val_data), ("--test-data", args.test_data)):
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{option} {folder} is not a folder")
    if settings["threads"] is not None:
        if settings["threads"] < 1:
            raise UserError(f"--threads must be >= 1, got {settings['threads']}")
        torch.set_num_threads(int(settings["threads"]))
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.quiet
    if settings["model"] is not None:
        _check_model(settings["model"], settings["task"], slices=settings["slices"])
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    loaded = load_training_data(data, task=settings["task"], slices=settings["slices"],
                                size=settings["size"], resolution=settings["resolution"],
                                channels=settings["channels"], val_fraction=settings["val_fraction"],
                                seed=settings["seed"], progress=progress, val_root=args.val_data)
    test_items = None
    if args.test_data is not None:
        test_items = load_heldout_items(args.test_data, settings["task"], settings["slices"], loaded,
                                        settings["channels"], progress)
    name = settings["model"] or loaded.default_model
    if settings["patch"] is not None and model_task(name) != "segment":
        raise UserError(f"--patch needs a fully convolutional segmentation model, not {name!r}")
    train_items = len(loaded.train)
    loaded = augment_training_set(loaded, settings["patch"], settings["patches_per_case"], bool(settings["flip"]),
                                  seed=settings["seed"], shift=int(settings["shift"] or 0),
                                  intensity=float(settings["intensity"] or 0.0))
    config = dict(settings["model_config"])
    n_in = loaded.channels
    if model_task(name) == "segment":
        config.update(in_channels=n_in, out_channels=len(loaded.region_names))
    else:
        config.update(in_channels=n_in, num_classes=len(loaded.class_names), image_size=list(loaded.input_size))
    if len(loaded.input_size) != model_dims(name):
        raise UserError(f"model {name!r} takes {model_dims(name)}D inputs but the data ({loaded.kind}) are "
                        f"{len(loaded.input_size)}D; choose another --model")
    torch.manual_seed(settings["seed"])
    model = build_model(name, **config)
    regions = {"region_names": loaded.region_names} if loaded.region_names else {}
    history = train(model, loaded.train, loaded.val, task=settings["task"], epochs=settings["epochs"],
                    batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                    progress=progress, device=device, **regions,
                    keep=settings["keep"] if loaded.val is not None else "final",
                    time_limit=args.max_minutes * 60 if args.max_minutes else None,
                    lr_schedule=settings["lr_schedule"])
    kept = next(r for r in history if r["kept"])
    test_metrics = None
    if test_items is not None:
        test_metrics = heldout_scores(model, InMemoryDataset(test_items), settings["task"],
                                      class_names=loaded.class_names, device=device, **regions)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    meta = {
        "task": settings["task"],
        "output": "sigmoid regions" if settings["task"] == "segment" else "class logits (softmax)",
        "class_names": loaded.class_names,
        "region_names": loaded.region_names,
        "channel_names": loaded.channel_names,
        "input_size": list(loaded.input_size),
        "preprocessing": loaded.preprocessing,
        "data": {"kind": loaded.kind, "train": _cohort_record(data, train_items),
                 "val": (_cohort_record(Path(args.val_data), len(loaded.val)) if args.val_data is not None
                         else {"from": "train", "fraction": settings["val_fraction"],
                               "samples": len(loaded.val) if loaded.val is not None else 0}),
                 **({"test": _cohort_record(Path(args.test_data), len(test_items))} if test_items is not None
                    else {})},
        "training": {k: settings[k] for k in ("epochs", "batch_size", "lr", "lr_schedule", "seed", "val_fraction",
                                              "keep", "patch", "patches_per_case", "flip", "shift", "intensity")}
                    | {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "wall_seconds": round(seconds, 1),
                       "cpu_seconds": round(cpu_seconds, 1),
                       "load_average": {"start": [round(v, 2) for v in load_before],
                                        "end": [round(v, 2) for v in os.getloadavg()]}},
        "metrics": {k: v for k, v in kept.items() if k.startswith("val_") or k == "epoch"},
        **({"test_metrics": test_metrics} if test_metrics is not None else {}),
    }
    out = save_checkpoint(model, meta, args.out, history=history)
    plot_history(history, out / "learning_curve.png",
                 title=f"{name} {settings['task']} on {data.name} ({loaded.kind})")
    if progress:
        print(f"saved {out} (epoch {kept['epoch']}: "
              + json.dumps({k: round(v, 4) for k, v in kept.items() if k.startswith("val_")}) + ")")
        if test_metrics is not None:
            print("test: " + json.dumps(_short_scores(test_metrics)))
    return 0


def _short_scores(scores: dict) -> dict:
    """The headline numbers of :func:`~voxplain.models.scores.heldout_scores`, rounded."""
    if "accuracy" in scores:
        return {"n": scores["n"], "accuracy": round(scores["accuracy"], 4)}
    return {"n": scores["n"], **{f"dice_{r}": (round(v["mean"], 4) if v["mean"] is not None else None, v["cases"])
                                 for r, v in scores["dice"].items()}}
