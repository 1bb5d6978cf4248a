"""Options shared by the explain, inspect and demo subcommands."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..models.bundle import BUNDLE_IS_CODE
from . import UserError

__all__ = ["add_model_input_arguments", "add_region_argument", "add_run_arguments", "add_grid_arguments",
           "grid_options", "parse_options", "parse_methods", "parse_output_key", "command_line", "MODEL_HELP",
           "REGION_HELP"]

#: what --region means, shared by explain, inspect and demo
REGION_HELP = ("segmentation: the voxels a class channel is averaged over to make the explained score: "
               "'predicted' (default: the voxels the model predicts as that class, so the maps explain the "
               "segmented object), 'all' (every voxel, NeuroXAI's global average pooling; on a tumour it mostly "
               "explains background) or 'label' (the case's ground-truth segmentation of that class/region). "
               "A class with an empty region is skipped and the report says why")

#: what --model accepts, and which kinds run code (shared by explain, inspect and evaluate)
MODEL_HELP = ("a voxplain checkpoint folder; a shipped model by name: demo-unet, demo-grade, demo-slices (a local "
              "folder of that name wins); a MONAI bundle folder (configs/ + models/model.pt: its preprocessing, "
              "sliding-window inferer, channel and class names are used); 'module:factory' or 'file.py:factory' "
              "with --weights (imports and runs that Python code); or a TorchScript file (it carries code that "
              "runs: trusted files only). " + BUNDLE_IS_CODE[0].upper() + BUNDLE_IS_CODE[1:]
              + ". Weights files are read with weights_only=True")


def add_model_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --weights, --input, --task, --target, --out and friends."""
    parser.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", help="state_dict file for 'module:factory' (weights_only load)")
    parser.add_argument("--random-weights", action="store_true",
                        help="allow 'module:factory' without --weights: explain the untrained network on purpose "
                             "(the report says so in red)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow loading a whole pickled model (runs code from the file; trusted files only)")
    parser.add_argument("--input", required=True, nargs="+", metavar="X",
                        help="BraTS case folder, folder of cases, NIfTI file(s) (one channel each), a folder of "
                             "DICOM series (one per modality) or a 2D image (PNG, JPEG, TIFF; 16-bit kept)")
    parser.add_argument("--task", choices=["classify", "segment"],
                        help="classify: (B, K) output; segment: (B, K, *spatial) output "
                             "(default: from the checkpoint, else classify)")
    parser.add_argument("--target", metavar="T",
                        help="class/channel indices or names, comma-separated; 'predicted' (classification "
                             "default) or 'all' (segmentation default: every output channel)")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="2D images: read as 1 (grey) or 3 (RGB) channels")
    parser.add_argument("--channels-from-4d", action="store_true",
                        help="read a 4D NIfTI file's volumes as input channels (refused otherwise: a 4th axis "
                             "is usually time)")
    parser.add_argument("--output-key", metavar="KEY", type=parse_output_key,
                        help="for a model that returns a tuple/list or dict: the index (e.g. 0) or key (e.g. logits) "
                             "of the output to explain")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: new, empty, or an earlier output of the same command that holds "
                             "nothing else (replaced only when complete)")


def add_region_argument(parser: argparse.ArgumentParser) -> None:
    """--region predicted|all|label (segmentation pooling)."""
    from ..report.regions import DEFAULT_REGION, REGION_CHOICES

    parser.add_argument("--region", choices=REGION_CHOICES, default=DEFAULT_REGION, help=REGION_HELP)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --batch-size, --memory-budget, --seed, --quiet."""
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: the model's)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="rows per forward/backward pass")
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="memory one pass may use, e.g. 512MB, 2GB, 1TB; an input too large for it is refused "
                             "with its estimated need (default: passes of 2GB, a larger input runs alone if the "
                             "machine has the memory free)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random methods (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def parse_output_key(text: str) -> int | str:
    """``--output-key``: an int index when it looks like one, else a dict key."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def add_grid_arguments(parser: argparse.ArgumentParser, pad_multiple: bool = True) -> None:
    """--spacing, --pad-multiple and the sliding window (--roi, --overlap, --sw-mode, --sw-batch-size)."""
    group = parser.add_argument_group("scan grid and sliding window")
    group.add_argument("--spacing", metavar="MM",
                       help="voxel size the model was trained at, e.g. 1 or 1,1,1.5 (default: what the checkpoint or "
                            "bundle records; else the scan's own): the scan is resampled to it and the maps back")
    if pad_multiple:
        group.add_argument("--pad-multiple", metavar="N",
                           help="pad the scan to a multiple of N voxels (or N1,N2,N3) instead of the one found for "
                                "the network")
    group.add_argument("--roi", metavar="D,H,W",
                       help="apply the model by sliding windows of this size, as MONAI's sliding_window_inference "
                            "(patch-trained models; a fixed-size model such as UNETR needs its img_size here)")
    group.add_argument("--overlap", type=float, default=None, metavar="F",
                       help="sliding-window overlap in [0, 1) (default 0.5, or the bundle's)")
    group.add_argument("--sw-mode", choices=["gaussian", "constant"], default=None,
                       help="blending of overlapping windows (default gaussian, or the bundle's)")
    group.add_argument("--sw-batch-size", type=int, default=None, metavar="N",
                       help="windows per model call (default 1, or the bundle's); bounds a pass's memory")


def _ints(text: str, option: str, count: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise UserError(f"{option} must be integers separated by commas, got {text!r}") from None
    if not values or (count is not None and len(values) not in (1, count)) or any(v < 1 for v in values):
        raise UserError(f"{option} must be one positive integer or {count or 'one per axis'}, got {text!r}")
    return values


def grid_options(args: argparse.Namespace) -> dict:
    """``spacing``, ``pad_multiple`` and ``sliding_window`` keyword arguments from the grid options."""
    spacing = None
    if args.spacing is not None:
        try:
            spacing = tuple(float(t) for t in args.spacing.split(",") if t.strip())
        except ValueError:
            raise UserError(f"--spacing must be a voxel size in mm, one number or three, got {args.spacing!r}") from None
        if len(spacing) not in (1, 3) or not all(v > 0 for v in spacing):
            raise UserError(f"--spacing must be one positive number or three, got {args.spacing!r}")
        spacing = spacing * 3 if len(spacing) == 1 else spacing
    pad = None
    if getattr(args, "pad_multiple", None) is not None:
        pad = _ints(args.pad_multiple, "--pad-multiple", 3)
        pad = pad[0] if len(pad) == 1 else pad
    window = None
    extra = {k: v for k, v in (("overlap", args.overlap), ("mode", args.sw_mode),
                               ("sw_batch_size", args.sw_batch_size)) if v is not None}
    if args.roi is not None:
        roi = _ints(args.roi, "--roi", 3)
        window = {"roi_size": roi * 3 if len(roi) == 1 else roi, "overlap": 0.5, "mode": "gaussian", **extra}
    elif extra:
        raise UserError("--overlap, --sw-mode and --sw-batch-size set the sliding window: give its size with --roi "
                        "(a bundle's own inferer settings are used as they are)")
    return {"spacing": spacing, "pad_multiple": pad, "sliding_window": window}


def parse_methods(text: str, available: list[str]) -> list[str]:
    """A comma-separated method list; 'all' means every registered method."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("--methods is empty; name at least one method")
    if names == ["all"]:
        return list(available)
    return names


def parse_options(items: list[str] | None) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` items (VALUE read as JSON when it parses, else as a string)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not method or not option:
            raise UserError(f"--option {item!r} must look like METHOD.KEY=VALUE, e.g. integrated_gradients.steps=32")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[option] = value
    return out


def command_line() -> str:
    """The command as typed, for the report's settings."""
    return "voxplain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
