"""`voxplain demo`: the papers' showcases on built-in data, nothing downloaded."""

from __future__ import annotations

import argparse

from ._common import add_region_argument

HELP = "run the showcases on a built-in synthetic subject with the shipped models and write the report"
DESCRIPTION = """\
Generate a synthetic BraTS-like subject (four MRI modalities + tumour labels on
the MNI152 template) and explain the small models shipped with voxplain:
  1. glioma grade (HGG vs LGG), 3D classifier: NeuroXAI's seven methods
  2. ET / TC / WT sub-region segmentation, 3D U-Net: the seven methods per region,
     each region's output averaged over the voxels the U-Net predicts for it
     (--region; a region it does not predict is skipped and the report says so)
  3. tumour vs no tumour on an axial slice, 2D CNN: CXAI's stage 2 (XRAI, Blur IG,
     Guided IG, vanilla gradient, IG, SmoothGrad-IG)
  4. network inspection: Grad-CAM at every conv layer of the U-Net
then write NIfTI maps, figures, summary.json and report.html to --out.
Nothing is downloaded. The default preset takes a few minutes on 2 CPU cores;
--preset tiny (small crops, few steps) runs in well under a minute."""
EXAMPLES = """\
examples:
  voxplain demo --out demo-output
  voxplain demo --out /tmp/demo --preset tiny --quiet
  voxplain demo --out demo-output --device cuda"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain demo`."""
    parser.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    parser.add_argument("--preset", choices=["tiny", "default"], default="default",
                        help="default: model-sized crops and more steps; tiny: small crops, few steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic subject and random methods")
    parser.add_argument("--device", help="torch device (default cpu)")
    add_region_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def run(args: argparse.Namespace) -> int:
    """Run the demo and write the report."""
    from ..demo import run_demo

    out = run_demo(args.out, preset=args.preset, seed=args.seed, device=args.device, progress=not args.quiet,
                   region=args.region)
    if not args.quiet:
        print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0
