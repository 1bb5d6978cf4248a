"""`voxplain inspect`: Grad-CAM at every conv layer and per-filter activations of one layer."""

from __future__ import annotations

import argparse

from ._common import (add_grid_arguments, add_model_input_arguments, add_region_argument, add_run_arguments,
                      command_line, grid_options)
from .explain import _task_of

HELP = "network inspection: Grad-CAM at every conv layer in network order, activations of one layer"
DESCRIPTION = """\
Follow how a decision forms inside the network (NeuroXAI's network inspection):
Grad-CAM of the target at the output of every convolution block, in the order
the network runs them, plus the activation map of every filter of one layer.
Layers are labelled by where they sit (enc 1 ... bottleneck ... dec 1 ... head,
from execution order and resolution); summary.json has each full module path.
Segmentation targets are pooled over --region (default: the predicted voxels).
Writes figures/inspection_*.png, figures/filters_*.png, NIfTI maps of the first,
middle and last layer's CAM (volumes), summary.json and report.html to --out.
The scan is brought to the model as for `voxplain explain` (channels, spacing,
normalisation, size); with --roi (or a bundle's inferer) the CAMs are per-window
CAMs blended over the volume, and the filters are shown on the central window."""
EXAMPLES = """\
examples:
  voxplain inspect --model demo-unet --input BraTS20_001 --task segment --target WT --out out/inspect
  voxplain inspect --model demo-grade --input BraTS20_001 --layer features.2 --out out/inspect-grade"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain inspect`."""
    add_model_input_arguments(parser)
    parser.add_argument("--layer", metavar="NAME",
                        help="layer (name from model.named_modules()) whose filters to show (default: a middle one)")
    add_region_argument(parser)
    add_grid_arguments(parser)
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Inspect and write the report."""
    from ..report.pipeline import run_inspect

    out = run_inspect(args.model, args.input, args.out, task=args.task or _task_of(args.model), target=args.target,
                      layer=args.layer, weights=args.weights, device=args.device,
                      allow_unsafe_pickle=args.allow_unsafe_pickle, channels=args.channels, command=command_line(),
                      batch_size=args.batch_size, memory_budget=args.memory_budget, output_key=args.output_key,
                      region=args.region, channels_from_4d=args.channels_from_4d,
                      random_weights=args.random_weights, **grid_options(args))
    if not args.quiet:
        print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0
