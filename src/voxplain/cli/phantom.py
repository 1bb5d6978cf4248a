"""`voxplain phantom`: write a synthetic BraTS-like cohort with known ground truth."""

from __future__ import annotations

import argparse
import sys

HELP = "write a synthetic BraTS-like cohort (4 MRI modalities + tumour labels) on the MNI152 template"
DESCRIPTION = """\
Write a synthetic brain MRI cohort in the BraTS 2021 layout:
  OUT/NAME/NAME_{t1,t1ce,t2,flair,seg}.nii.gz, OUT/subjects.csv, OUT/cohort.json

Each subject is the MNI152 2009 template (bundled with nilearn, nothing is
downloaded) randomly deformed and rendered in the four contrasts with bias
field and Rician noise. Tumours: high grade (HGG) = necrotic core (label 1),
enhancing rim bright on t1ce (label 4), oedema bright on t2/flair (label 2);
low grade (LGG) = non-enhancing core (1) and oedema (2). subjects.csv lists
grade, shortcut marker, tumour centroid (voxel and mm) and ET/TC/WT volumes.
The same options and seed give byte-identical files."""
EXAMPLES = """\
examples:
  voxplain phantom --out cohort --subjects 10 --seed 0
  voxplain phantom --out cohort3mm --subjects 60 --resolution 3 --grades HGG:0.5,LGG:0.5
  voxplain phantom --out mixed --subjects 40 --healthy-fraction 0.25 --grades 0.7
  voxplain phantom --out shortcut --subjects 40 --shortcut 0.9:0.1   # marker in 90% HGG, 10% others"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain phantom`."""
    parser.add_argument("--out", required=True, metavar="DIR", help="cohort folder to write (replaced if it exists)")
    parser.add_argument("--subjects", type=int, default=10, metavar="N", help="number of subjects (default 10)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--resolution", type=int, default=2, choices=[1, 2, 3], metavar="MM",
                        help="voxel size in mm: 1, 2 (default) or 3")
    parser.add_argument("--grades", default="0.5", metavar="MIX",
                        help="fraction of high grade (e.g. 0.5) or weights 'HGG:0.5,LGG:0.5' (default 0.5)")
    parser.add_argument("--healthy-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of subjects without a tumour (default 0)")
    parser.add_argument("--shortcut", default="0", metavar="P[:Q]",
                        help="probability of the spurious marker in HGG subjects [and in the others] "
                             "(default 0: no marker)")
    parser.add_argument("--prefix", default="PHANTOM", help="subject name prefix (default PHANTOM)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="subjects generated at the same time (default 2; output does not depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print a one-line summary."""
    from ..data.phantom import generate_cohort

    rows = generate_cohort(args.out, subjects=args.subjects, seed=args.seed, resolution=args.resolution,
                           grades=args.grades, healthy_fraction=args.healthy_fraction, shortcut=args.shortcut,
                           prefix=args.prefix, progress=not args.quiet,
                           workers=args.workers)
    if not args.quiet:
        counts = {g: sum(r["grade"] == g for r in rows) for g in ("HGG", "LGG", "none")}
        markers = sum(int(r["shortcut"]) for r in rows)
        print(f"wrote {len(rows)} subjects to {args.out} ({counts['HGG']} HGG, {counts['LGG']} LGG, "
              f"{counts['none']} healthy, {markers} with shortcut marker) at {args.resolution} mm",
              file=sys.stderr)
    return 0
