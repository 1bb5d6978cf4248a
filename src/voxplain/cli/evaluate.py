"""`voxplain evaluate`: score explanation methods over a cohort (faithfulness, localisation, sanity checks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError
from ..evaluate.cohort import POOLS
from ._common import MODEL_HELP, add_grid_arguments, grid_options, parse_options

POOL_WORDS = {"predicted": "its predicted voxels", "all": "all voxels", "label": "its ground-truth voxels"}

HELP = "score explanation methods over a cohort: faithfulness, PIC, localisation, sanity checks"
DESCRIPTION = """\
Explain every case of a cohort with several methods and score the maps:
  faithfulness   deletion / insertion curves and AUC (probability of the explained class/region)
  pic            SIC (and AIC for classifiers), median curve over cases (XRAI paper / PAIR semantics)
  localisation   pointing game, relevance mass, relevance rank, ROC AUC per region (TC, WT, ET)
  complexity     sparseness (Gini) and normalised entropy
  features       tumour volume error, centroid distance and Dice of the thresholded map vs WT
  shortcut       share of relevance on the phantom's shortcut marker (cases that carry it)
  randomisation  cascading model-parameter randomisation and random-logit check (first case(s))

Writes to --out: metrics.json ({method: {metric: mean}}), metrics_per_case.json,
metrics.csv, metrics_per_case.csv, curves.json/png, randomisation.json/png and
report.html (a self-contained method x metric table with the plots).

--model is a voxplain checkpoint folder (from `voxplain train`), a shipped model
(demo-unet, demo-grade, demo-slices), a MONAI bundle folder, 'module:factory'
(+ --weights) or a TorchScript file (bundles and TorchScript carry code: trusted
files only). Cohort cases (and their masks, nearest neighbour) are resampled to
the voxel spacing the model records (or --spacing) before they are cropped.
--data is a BraTS / phantom cohort folder
(grade classifier or region U-Net) or a 2D image folder (no masks: faithfulness,
PIC, complexity, randomisation only). --demo needs neither: it trains a small 2D
CNN on a synthetic task with a known target and a shortcut marker (a few minutes
on two CPU cores; --cases N for fewer cases)."""
EXAMPLES = """\
examples:
  voxplain evaluate --demo --out eval-demo
  voxplain evaluate --model demo-grade --data heldout --out eval-grade \\
      --methods vanilla_gradient,guided_backprop,integrated_gradients,gradcam,guided_gradcam
  voxplain evaluate --model demo-unet --data heldout --region WT --out eval-unet --cases 20
  voxplain evaluate --model demo-grade --data heldout --out eval --metrics localisation,complexity \\
      --option integrated_gradients.steps=16"""

#: NeuroXAI's seven methods plus CXAI's XRAI and Blur IG
DEFAULT_METHODS = ("vanilla_gradient,guided_backprop,integrated_gradients,guided_ig,smoothgrad,gradcam,guided_gradcam,"
                   "xrai,blur_ig")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `voxplain evaluate`."""
    parser.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", help="state_dict for a 'module:factory' model")
    parser.add_argument("--random-weights", action="store_true",
                        help="allow 'module:factory' without --weights (evaluate the untrained network on purpose)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow loading a fully pickled model file (runs code from the file)")
    parser.add_argument("--data", metavar="DIR", help="cohort folder or 2D image folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced when complete)")
    parser.add_argument("--demo", action="store_true", help="synthetic 2D task with a trained small CNN")
    parser.add_argument("--methods", default=DEFAULT_METHODS, metavar="LIST",
                        help=f"comma-separated method names (default {DEFAULT_METHODS})")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="method option, VALUE as JSON if it parses (repeatable)")
    parser.add_argument("--metrics", metavar="LIST", help="comma-separated metric families (default all)")
    parser.add_argument("--task", choices=["classify", "segment"], help="default: from the checkpoint")
    parser.add_argument("--region", default="WT", choices=["ET", "TC", "WT"],
                        help="BraTS region explained for a segmentation model (default WT)")
    parser.add_argument("--pool", default="predicted", choices=list(POOLS),
                        help="segmentation: what the region's channel is averaged over: 'predicted' (default: the "
                             "voxels the model predicts as the region), 'all' (every voxel, NeuroXAI's global "
                             "average pooling) or 'label' (the case's ground truth); what `explain --region` "
                             "calls the region. Cases with an empty region are skipped (listed in the output)")
    parser.add_argument("--cases", type=int, metavar="N", help="evaluate at most N cases")
    parser.add_argument("--size", metavar="S", help="input size, e.g. 64,64,48 (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    parser.add_argument("--baseline", default="zero", choices=["zero", "mean", "blur"],
                        help="what deleted voxels become (default zero)")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="VOXELS",
                        help="pointing game tolerance in voxels (default 0)")
    parser.add_argument("--randomisation-cases", type=int, default=1, metavar="N",
                        help="cases that get the randomisation checks (default 1; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random methods and metrics (default 0)")
    parser.add_argument("--device", help="torch device (default: the model's)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="rows per forward/backward pass")
    parser.add_argument("--memory-budget", metavar="SIZE", help="memory per pass, e.g. 2GB (default 2GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_grid_arguments(parser, pad_multiple=False)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(text: str | None):
    if text is None:
        return None
    try:
        return [int(t) for t in _split(text)]
    except ValueError:
        raise UserError(f"--size must be integers separated by commas, got {text!r}") from None


def _load(args):
    """(model, cases iterable, number of cases, title, sliding window) for the chosen input."""
    from ..evaluate.cohort import cohort_cases, count_cohort_cases, image_folder_cases

    if args.demo:
        if args.model or args.data:
            raise UserError("--demo makes its own model and data; leave out --model and --data")
        from ..evaluate.demo import demo_cases, train_demo_model

        if not args.quiet:
            print("demo: training a small 2D CNN on the synthetic disc task ...", file=sys.stderr)
        model, acc = train_demo_model(seed=args.seed)
        if not args.quiet:
            print(f"demo: held-out accuracy {acc:.2f}", file=sys.stderr)
        cases = demo_cases(args.cases or 20, seed=args.seed)
        return model, cases, len(cases), f"voxplain evaluation: demo (accuracy {acc:.2f})", None
    if not args.model or not args.data:
        raise UserError("give --model and --data (or --demo)")
    from ..report.pipeline import load_model_spec, model_grid
    from ..report.preparation import canonical_channel

    loaded = load_model_spec(args.model, args.weights, args.allow_unsafe_pickle, args.random_weights)
    model, config, path = loaded.model, loaded.config, Path(args.model)
    options = grid_options(args)
    grid = model_grid(config, loaded.bundle, options["spacing"], None, options["sliding_window"])
    step = grid.normalisation
    if step is not None and not (step.name == "NormalizeIntensity" and step.args.get("nonzero")
                                 and step.args.get("channel_wise")):
        raise UserError(f"evaluate z-scores cohort cases per modality over the brain; the bundle normalises with "
                        f"{step.name}({step.args}) instead; explain its cases one by one with `voxplain explain`")
    modalities = None
    if grid.channel_names is not None:
        modalities = [canonical_channel(c) for c in grid.channel_names]
        if None in modalities:
            raise UserError(f"cannot tell which BraTS modality each input channel of {args.model} is "
                            f"({', '.join(grid.channel_names)})")
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"data folder {data} not found")
    size = _size(args.size) or config.get("input_size")
    from ..data.brats import find_brats_cases

    if find_brats_cases(data):
        task = args.task or ("segment" if config.get("region_names") else "classify")
        n = count_cohort_cases(data, task, size)
        if args.cases:
            n = min(n, args.cases)
        cases = cohort_cases(data, task, size, region=args.region,
                             region_channels=config.get("region_names"), limit=n, pool=args.pool,
                             spacing=grid.spacing, orientation=grid.orientation, modalities=modalities)
        what = f"{args.region}, mean over {POOL_WORDS[args.pool]}" if task == "segment" else task
        return model, cases, n, f"voxplain evaluation: {path.name} on {data.name} ({what})", grid.sliding_window
    channels = len(config.get("channel_names") or ["grey"])
    cases = list(image_folder_cases(data, size=size or (64, 64), channels=channels, limit=args.cases))
    if not cases:
        raise UserError(f"{data} holds neither BraTS case folders nor images")
    return model, cases, len(cases), f"voxplain evaluation: {path.name} on {data.name}", grid.sliding_window


def run(args: argparse.Namespace) -> int:
    """Load model and cases, run the metrics, write the output folder."""
    from ..atomic import check_replaceable
    from ..evaluate.output import write_evaluation
    from ..evaluate.runner import FAMILIES, evaluate_cases
    from ..methods import available_methods

    methods = _split(args.methods)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; available: {', '.join(available_methods())}")
    families = _split(args.metrics) if args.metrics else list(FAMILIES)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise UserError(f"unknown metric famil(ies) {bad}; choose from {', '.join(FAMILIES)}")
    if args.cases is not None and args.cases < 1:
        raise UserError(f"--cases must be >= 1, got {args.cases}")
    options = parse_options(args.option)
    check_replaceable(args.out, "evaluate")  # before hours of work, not only when writing
    model, cases, n, title, window = _load(args)
    if n == 0:
        raise UserError("no cases to evaluate")
    from tqdm.auto import tqdm

    cases = tqdm(cases, total=n, desc="cases", disable=args.quiet)
    result = evaluate_cases(model, cases, methods, options, families=families, steps=args.steps,
                            baseline=args.baseline, tolerance=args.tolerance,
                            randomisation_cases=args.randomisation_cases, seed=args.seed, device=args.device,
                            batch_size=args.batch_size, memory_budget=args.memory_budget, sliding_window=window)
    out = write_evaluation(result, args.out, title=title)
    if not args.quiet:
        summary = result.summary()
        print(f"evaluated {len(result.cases)} case(s) x {len(methods)} method(s); wrote {out}/report.html")
        for name, why in result.settings.get("skipped_cases", {}).items():
            print(f"skipped {name}: {why}")
        keys = [k for k in ("deletion_auc", "insertion_auc", "WT_relevance_mass", "WT_pointing_game",
                            "randomisation_ssim") if any(k in s for s in summary.values())]
        print("method".ljust(24) + "".join(k.rjust(20) for k in keys))
        for m in methods:
            print(m.ljust(24) + "".join(f"{summary[m].get(k, float('nan')):20.3f}" for k in keys))
    return 0
