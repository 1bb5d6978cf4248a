"""`voxplain sweep`: CXAI stage 1, the architecture and hyper-parameter grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train a grid of 2D CNNs (blocks x batch size x learning rate) with Optuna; resumable"
DESCRIPTION = """\
CXAI stage 1: train the 2D CNN with each combination of conv blocks, batch size and
learning rate the same way, record validation accuracy per epoch, and keep the best
model. Trials are stored in an Optuna RDB storage (default: SQLite file sweep.db in
--out). Re-running the same command resumes: finished trials are kept, trials whose
worker died are re-run.

To spread one grid over several machines, give every machine the same
PostgreSQL or MySQL --storage URL (and the same data and settings) and run the
same command on each; every machine writes its trials' checkpoints under its own
--out, and any machine that finds the grid complete writes the tables and figures.
"""
EXAMPLES = """\
examples:
  voxplain sweep --quick --out sweep-try
  voxplain sweep --data brain-tumour-mri/ --epochs 10 --workers 2 --out sweep
  voxplain sweep --data cohort/ --blocks 3 5 --batch-sizes 32 64 --learning-rates 1e-3 1e-4 --out sweep
  voxplain sweep --data cohort/ --storage postgresql+psycopg2://user:pw@dbhost/sweeps --out sweep
"""

QUICK = {"image_size": 32, "max_images": 600, "epochs": 2, "phantom_subjects": 6}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="2D image folder (one sub-folder per class) or a phantom/BraTS cohort (axial slices, "
                        "tumour vs no tumour); default: generate a small phantom cohort in OUT/phantom")
    p.add_argument("--out", type=Path, required=True, help="sweep folder (created; reused to resume)")
    p.add_argument("--blocks", type=float, nargs="+", default=[3, 5, 7], help="conv block counts (default 3 5 7)")
    p.add_argument("--batch-sizes", type=float, nargs="+", default=[16, 32, 64, 128],
                   help="batch sizes (default 16 32 64 128)")
    p.add_argument("--learning-rates", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4],
                   help="Adam learning rates (default 1e-2 1e-3 1e-4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 5; --quick: 2)")
    p.add_argument("--image-size", type=int, default=None, help="images resized to SxS (default 64; --quick: 32)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images (default all)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class (default 0.2)")
    p.add_argument("--phantom-subjects", type=int, default=None,
                   help="subjects of the generated phantom cohort when --data is not given (default 20)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/sweep.db)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once on this machine (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and shuffling")
    p.add_argument("--stale-after", type=int, default=30,
                   help="seconds without a heartbeat after which a trial's worker counts as dead (default 30)")
    p.add_argument("--quick", action="store_true", help="small images, data and epochs, for a try-out")
    p.add_argument("--explain-best", action="store_true",
                   help="explain the best model on held-out images with CXAI's methods (stage 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..sweep import SweepGrid, SweepSettings, check_storage, open_sweep_folder, prepare_data, run_grid_sweep

    grid = SweepGrid(tuple(args.blocks), tuple(args.batch_sizes), tuple(args.learning_rates))
    epochs = args.epochs or (QUICK["epochs"] if args.quick else 5)
    image_size = args.image_size or (QUICK["image_size"] if args.quick else 64)
    max_images = args.max_images or (QUICK["max_images"] if args.quick else None)
    subjects = args.phantom_subjects or (QUICK["phantom_subjects"] if args.quick else 20)
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.data is not None and not args.data.exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    progress = not args.quiet
    open_sweep_folder(args.out)
    storage = args.storage or f"sqlite:///{(args.out / 'sweep.db').resolve()}"
    check_storage(storage)
    data = prepare_data(args.out, args.data, image_size, max_images, args.seed, args.val_fraction, subjects,
                        progress=progress)
    grid.check_against(len(data.train_y), data.image_size)
    settings = SweepSettings(storage=storage, out=str(args.out), data_file=str(args.out / "sweep-data.pt"),
                             blocks=grid.blocks, batch_sizes=grid.batch_sizes, learning_rates=grid.learning_rates,
                             epochs=epochs, seed=args.seed, stale_after=max(2, args.stale_after),
                             heartbeat=max(1, min(5, args.stale_after // 3)),
                             progress=progress and args.workers == 1)
    if progress:
        print(f"sweep: {len(grid)} configurations, {len(data.train_y)} training / {len(data.val_y)} validation "
              f"images of {data.image_size}x{data.image_size}, {epochs} epoch(s), storage {storage}",
              file=sys.stderr)
    bar = tqdm(total=len(grid), desc="trials", disable=not progress, position=0)
    try:
        outcome = run_grid_sweep(settings, workers=args.workers, progress_bar=bar, baseline=data.majority_baseline())
    finally:
        bar.close()
    best = outcome.best
    print(f"best: {best.config} (blocks={best.blocks}, batch size={best.batch_size}, lr={best.learning_rate:g}) "
          f"validation accuracy {best.best_val_accuracy:.4f} at epoch {best.best_epoch} (majority-class "
          f"baseline {outcome.baseline:.4f}); model in {outcome.best_model}")
    if not outcome.beats_baseline:
        print(f"warning: the best trial does not beat the majority-class baseline ({outcome.baseline:.4f}): every "
              "model predicts about as well as always answering the most frequent class; train longer (--epochs), "
              "on more images (--max-images, --phantom-subjects) or with other learning rates", file=sys.stderr)
    if args.explain_best:
        from ..sweep.stage2 import explain_best

        report = explain_best(outcome.best_model, data, args.out / "best_explained", seed=args.seed,
                              progress=progress)
        print(f"stage 2 report: {report}")
    return 0
