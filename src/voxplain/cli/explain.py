"""`voxplain explain`: maps of several methods for a model and an input, written as a report."""

from __future__ import annotations

import argparse
import sys

from ..methods.registry import DEFAULT_METHODS
from . import UserError
from ._common import (add_cluster_arguments, add_grid_arguments, add_model_input_arguments, add_region_argument,
                      add_run_arguments, cohort_outcome, command_line, grid_options, parse_methods, parse_options)

HELP = "explain a model's decision on a scan or image: NIfTI maps, figures, summary.json, report.html"
DESCRIPTION = """\
Run explanation methods on one input (or every case of a folder) and write to --out:
  maps/<target>_<method>.nii.gz  raw float32 maps on the scan's grid (same shape, affine, qform/sform codes)
  prediction.nii.gz              segmentation models: the predicted label map on the scan's grid
                                 (BraTS labels 1/2/4 for TC/WT/ET region models, argmax labels otherwise)
  figures/comparison_*.png       input channels, then one column per method, one row per target
  summary.json                   model, targets (and how each is pooled), prediction vs ground truth,
                                 per-method options, seconds, warnings and flags (all-zero maps...)
  report.html                    self-contained viewer (open it from disk; no network needed)
A folder of cases gives one sub-folder per case and an index.html.
Segmentation channels are explained by their output averaged over the voxels the
model predicts as that class (--region predicted, the default); --region all is
NeuroXAI's whole-volume average, --region label the case's ground truth. A class
the model does not predict at all is skipped, and the report says so.
With --workers N (a local Dask cluster) or --scheduler ADDRESS (an existing one) the
cases of a folder run in parallel, one task per case; each case folder is written
atomically, failed cases are listed in index.html and failures.csv (exit code 1), and
the same command run again skips the cases already complete.
Volumes are brought to the model: channels in its order (bundles), resampled to
the voxel spacing and orientation it was trained at (config.json, the bundle, or
--spacing), z-scored per modality over non-zero voxels (or the bundle's own
normalisation), cropped/padded as the checkpoint says or padded to the size
multiple the network needs (--pad-multiple forces it). Maps are put back on the
scan's own grid and affine: linear interpolation for maps, nearest neighbour for
label maps. --roi applies a patch-trained model by sliding windows exactly as
MONAI's sliding_window_inference does; every method explains the score of the
stitched whole-volume output, one window batch at a time.
A MONAI bundle folder is code (its configs import and run Python, like
TorchScript and module:factory): load only bundles you trust.

--model demo-grade, demo-unet and demo-slices are the small models shipped with
voxplain (trained on synthetic phantoms); a local folder of the same name wins.
'module:factory' imports Python code; a TorchScript file and a MONAI bundle
folder carry code that runs (a bundle's configs import and run Python): load
those only from sources you trust."""
EXAMPLES = """\
examples:
  voxplain explain --model demo-grade --input BraTS20_001 --task classify --out out/grade
  voxplain explain --model demo-unet --input BraTS20_001 --task segment --target WT,ET \\
      --methods vanilla_gradient,integrated_gradients,gradcam --option integrated_gradients.steps=16 --out out/seg
  voxplain explain --model models/demo-unet --input BraTS20_001 --target WT --region all --out out/seg-global
  voxplain explain --model mynet.py:build --weights mynet.pt --input t1.nii.gz t2.nii.gz --out out/mine
  voxplain explain --model slice_cnn.ts --input slice.png --methods xrai,blur_ig --out out/slice
  voxplain explain --model brats_mri_segmentation --input BraTS2021_00000 --target "Whole tumor" \\
      --methods vanilla_gradient,gradcam --out out/bundle          # a MONAI bundle: its inferer, its preprocessing
  voxplain explain --model monai.networks.nets:SegResNet --weights segresnet.pt --input case/ --task segment \\
      --roi 96,96,96 --overlap 0.5 --spacing 1 --out out/patches
  voxplain explain --model demo-unet --input cohort --workers 4 --out out/cohort
  voxplain explain --model demo-unet --input /shared/cohort --scheduler tcp://head:8786 --out /shared/out"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain explain`."""
    add_model_input_arguments(parser)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
                        help="comma-separated method names, or 'all' (default: NeuroXAI's seven)")
    parser.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                        help="a method option, repeatable, e.g. guided_ig.steps=50")
    add_region_argument(parser)
    add_grid_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--fold-batchnorm", action="store_true",
                        help="run eval-mode batch norms folded into the convolution before them in the passes of "
                             "path and noise methods (IG, SmoothGrad, occlusion ...): about 1.2-1.4x faster on a "
                             "CPU, but the maps move by float32 rounding times the model's condition (off by default; "
                             "the report's settings say which was used)")
    add_cluster_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Explain and write the report."""
    from ..methods import available_methods
    from ..report.pipeline import run_explain

    methods = parse_methods(args.methods, available_methods())
    if args.workers is not None or args.scheduler is not None:
        return _run_on_cluster(args, methods)
    out = run_explain(args.model, args.input, args.out, task=args.task or _task_of(args.model), target=args.target,
                      methods=methods, weights=args.weights, options=parse_options(args.option),
                      device=args.device, seed=args.seed, progress=not args.quiet, batch_size=args.batch_size,
                      memory_budget=args.memory_budget, region=args.region,
                      allow_unsafe_pickle=args.allow_unsafe_pickle, channels=args.channels, command=command_line(),
                      output_key=args.output_key, channels_from_4d=args.channels_from_4d,
                      random_weights=args.random_weights, fold_batchnorm=args.fold_batchnorm, **grid_options(args))
    if not args.quiet:
        index = out / "index.html" if (out / "index.html").exists() else out / "report.html"
        print(f"wrote {out}/ (open {index})")
    return 0


def _run_on_cluster(args: argparse.Namespace, methods: list[str]) -> int:
    """The cases of a folder on a Dask cluster; exit code 1 when some failed."""
    from ..cohort import run_explain_cohort

    result = run_explain_cohort(args.model, args.input, args.out, task=args.task or _task_of(args.model),
                                target=args.target, methods=methods, workers=args.workers, scheduler=args.scheduler,
                                weights=args.weights, options=parse_options(args.option), device=args.device,
                                seed=args.seed, progress=not args.quiet, batch_size=args.batch_size,
                                memory_budget=args.memory_budget, region=args.region,
                                allow_unsafe_pickle=args.allow_unsafe_pickle, channels=args.channels,
                                command=command_line(), output_key=args.output_key,
                                channels_from_4d=args.channels_from_4d, random_weights=args.random_weights,
                                fold_batchnorm=args.fold_batchnorm, **grid_options(args),
                                say=None if args.quiet else lambda text: print(text, file=sys.stderr))
    return cohort_outcome(result, args.quiet)


def _task_of(model: str) -> str:
    """The checkpoint's task (segment for a MONAI bundle), else classify."""
    from ..models.bundle import is_bundle_folder
    from ..models.checkpoint import is_checkpoint_path, read_checkpoint_config, resolve_model_spec

    path = resolve_model_spec(model)
    if is_bundle_folder(path):
        return "segment"
    if is_checkpoint_path(path):
        try:
            return read_checkpoint_config(path).get("task", "classify")
        except (ValueError, FileNotFoundError) as err:
            raise UserError(str(err)) from None
    return "classify"
