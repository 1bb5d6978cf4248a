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

Presets fix every training choice (model, sizes, epochs, lr, seed) for the small
pretrained models of the demo; any option given explicitly overrides the preset.
The same preset, data and seed give the same weights on the same device."""
EXAMPLES = """\
presets (the demo's small models; data from `voxplain phantom`):
  voxplain phantom --out cohort --subjects 60 --seed 0 --resolution 3
  voxplain train --preset demo-unet   --data cohort --out models/demo-unet
  voxplain train --preset demo-grade  --data cohort --out models/demo-grade
  voxplain train --preset demo-slices --data cohort --out models/demo-slices

examples:
  voxplain train --task segment --data cohort --model unet3d --epochs 20 --out runs/unet
  voxplain train --task classify --data cohort --model classifier3d --out runs/grade
  voxplain train --task classify --data cohort --slices --model cnn2d --blocks 5 --size 64 --out runs/slices
  voxplain train --task classify --data chest_xray/train --model cnn2d --blocks 7 --size 64 --out runs/xray"""

#: the demo's small pretrained models: every training choice fixed
PRESETS: dict[str, dict] = {
    # 32^3 tumour-biased patches with left-right flips: about 2.3x less compute per epoch than whole
    # 48x64x48 crops and better Dice per epoch on the 3 mm phantom (benchmarks/bench_models.py)
    "demo-unet": {"task": "segment", "model": "unet3d", "epochs": 40, "batch_size": 4, "lr": 3e-3, "seed": 0,
                  "size": "48,64,48", "patch": "32", "patches_per_case": 2, "flip": True,
                  "model_config": {"channels": [8, 16, 32, 64]}},
    "demo-grade": {"task": "classify", "model": "classifier3d", "epochs": 25, "batch_size": 4, "lr": 1e-3,
                   "seed": 0, "size": "48,64,48", "model_config": {"blocks": 4, "base_width": 8}},
    "demo-slices": {"task": "classify", "slices": True, "model": "cnn2d", "blocks": 5, "size": "64", "epochs": 8,
                    "batch_size": 32, "lr": 1e-3, "seed": 0},
}

_DEFAULTS = {"task": "classify", "model": None, "blocks": None, "epochs": 10, "batch_size": 8, "lr": 1e-3, "seed": 0,
             "val_fraction": 0.2, "resolution": None, "size": None, "slices": False, "channels": 1, "keep": "best",
             "patch": None, "patches_per_case": 2, "flip": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain train`."""
    parser.add_argument("--data", required=True, metavar="DIR", help="cohort folder or 2D image folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fixed settings of a demo model")
    parser.add_argument("--task", choices=["classify", "segment"], help="classify (default) or segment")
    parser.add_argument("--model", metavar="NAME",
                        help="zoo model: cnn2d, classifier3d or unet3d (default: by task and data)")
    parser.add_argument("--blocks", type=int, metavar="N", help="conv blocks of cnn2d / classifier3d (3, 5, 7)")
    parser.add_argument("--slices", action="store_true", default=None,
                        help="train on 2D axial slices of a cohort (tumour vs no tumour)")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="batch size (default 8)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, help="seed of initialisation, split, shuffling, dropout (default 0)")
    parser.add_argument("--val-fraction", type=float, metavar="F", help="held-out fraction (default 0.2)")
    parser.add_argument("--resolution", type=int, choices=[1, 2, 3], metavar="MM",
                        help="cohort voxel size in mm; sets the default crop size")
    parser.add_argument("--size", metavar="S",
                        help="input size: one number or one per axis, e.g. 64 or 48,56,40 (crop/pad or resize)")
    parser.add_argument("--patch", metavar="S",
                        help="train on random patches of this size (fully convolutional models, e.g. unet3d)")
    parser.add_argument("--patches-per-case", type=int, metavar="N", help="patches per sample and epoch (default 2)")
    parser.add_argument("--flip", action="store_true", default=None, help="random left-right flips in training")
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


_MODEL_DIMS = {"cnn2d": 2, "classifier3d": 3, "unet3d": 3}


def _check_model(name: str, task: str, slices: bool) -> None:
    from ..models import available_models

    if name not in available_models():
        raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    if (name == "unet3d") != (task == "segment"):
        raise UserError(f"model {name!r} does not fit task {task!r}: "
                        "use unet3d to segment, cnn2d or classifier3d to classify")
    if slices and name != "cnn2d":
        raise UserError(f"--slices gives 2D images; model {name!r} is 3D, use cnn2d")


def run(args: argparse.Namespace) -> int:
    """Load the data, train, save checkpoint + history + learning curve."""
    import torch

    from ..atomic import check_replaceable
    from ..models import build_model, save_checkpoint, train
    from ..models.curves import plot_history
    from ..models.training_data import augment_training_set, load_training_data

    settings = _settings(args)
    check_replaceable(args.out, "checkpoint")  # before training, not only when saving
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.quiet
    if settings["model"] is not None:
        _check_model(settings["model"], settings["task"], slices=settings["slices"])
    loaded = load_training_data(data, task=settings["task"], slices=settings["slices"],
                                size=settings["size"], resolution=settings["resolution"],
                                channels=settings["channels"], val_fraction=settings["val_fraction"],
                                seed=settings["seed"], progress=progress)
    name = settings["model"] or loaded.default_model
    if settings["patch"] is not None and name != "unet3d":
        raise UserError(f"--patch needs a fully convolutional model (unet3d), not {name!r}")
    loaded = augment_training_set(loaded, settings["patch"], settings["patches_per_case"], bool(settings["flip"]),
                                  seed=settings["seed"])
    config = dict(settings["model_config"])
    n_in = loaded.channels
    if name == "unet3d":
        config.update(in_channels=n_in, out_channels=len(loaded.region_names))
    else:
        config.update(in_channels=n_in, num_classes=len(loaded.class_names), image_size=list(loaded.input_size))
    if len(loaded.input_size) != _MODEL_DIMS.get(name, len(loaded.input_size)):
        raise UserError(f"model {name!r} takes {_MODEL_DIMS[name]}D inputs but the data ({loaded.kind}) are "
                        f"{len(loaded.input_size)}D; choose another --model")
    torch.manual_seed(settings["seed"])
    model = build_model(name, **config)
    history = train(model, loaded.train, loaded.val, task=settings["task"], epochs=settings["epochs"],
                    batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                    progress=progress, device=device, **({"region_names": loaded.region_names} if loaded.region_names else {}),
                    keep=settings["keep"] if loaded.val is not None else "final",
                    time_limit=args.max_minutes * 60 if args.max_minutes else None)
    kept = next(r for r in history if r["kept"])
    meta = {
        "task": settings["task"],
        "output": "sigmoid regions" if settings["task"] == "segment" else "class logits (softmax)",
        "class_names": loaded.class_names,
        "region_names": loaded.region_names,
        "channel_names": loaded.channel_names,
        "input_size": list(loaded.input_size),
        "preprocessing": loaded.preprocessing,
        "data": {"path": str(data), "kind": loaded.kind, "train": len(getattr(loaded.train, "base", loaded.train)),
                 "val": len(loaded.val) if loaded.val is not None else 0},
        "training": {k: settings[k] for k in ("epochs", "batch_size", "lr", "seed", "val_fraction", "keep",
                                              "patch", "patches_per_case", "flip")}
                    | {"preset": args.preset, "device": str(device)},
        "metrics": {k: v for k, v in kept.items() if k.startswith("val_") or k == "epoch"},
    }
    out = save_checkpoint(model, meta, args.out, history=history)
    plot_history(history, out / "learning_curve.png",
                 title=f"{name} {settings['task']} on {data.name} ({loaded.kind})")
    if progress:
        print(f"saved {out} (epoch {kept['epoch']}: "
              + json.dumps({k: round(v, 4) for k, v in kept.items() if k.startswith("val_")}) + ")")
    return 0
