"""CXAI stage 1: train a grid of 2D CNNs the same way and pick the best, resumably.

``run_grid_sweep`` prepares the data once, runs the grid with Optuna (grid
sampler, RDB storage: SQLite by default, PostgreSQL/MySQL to spread over
machines), then writes ``trials.csv``, ``histories.json``, one accuracy figure per
block count, a summary figure and the best model's checkpoint (``best_model/``).
Running it again on the same folder resumes: finished trials are kept. Only a
folder the sweep itself made is resumed (see :func:`open_sweep_folder`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, atomic_file, claim_folder
from .data import DATA_FILE, SweepData
from .grid import SweepGrid, config_key
from .plots import plot_block_grids, plot_summary
from .results import TrialResult, best_result, collect_results, write_histories, write_trials_csv
from .runner import SweepSettings, check_storage, grid_status, open_study, run_sweep

__all__ = ["SweepGrid", "SweepSettings", "SweepOutcome", "SweepData", "prepare_data", "run_grid_sweep",
           "config_key", "grid_status", "open_study", "open_sweep_folder", "check_storage"]

SETTINGS_FILE = "sweep.json"
#: the default SQLite storage and the files SQLite keeps beside it
STORAGE_FILES = ("sweep.db", "sweep.db-journal", "sweep.db-wal", "sweep.db-shm")


def open_sweep_folder(out: str | Path) -> Path:
    """Create the sweep folder ``out``, or take it up again to resume if a sweep made it.

    A folder holding anything voxplain's sweep did not write there is refused
    (:class:`~voxplain.atomic.OutputFolderError`), so that no file of the user's is
    overwritten or deleted.
    """
    return claim_folder(out, "sweep", expected=STORAGE_FILES)


@dataclass
class SweepOutcome:
    """What a finished sweep wrote and found."""

    results: list[TrialResult]
    best: TrialResult
    best_model: Path
    files: list[Path]
    baseline: float | None = None  # validation accuracy of always predicting the majority class

    @property
    def beats_baseline(self) -> bool:
        """Whether the best trial is better than a constant predictor (True when no baseline is known)."""
        return self.baseline is None or self.best.best_val_accuracy > self.baseline + 1e-9


def prepare_data(out: Path, data: str | Path | None, image_size: int, max_images: int | None, seed: int,
                 val_fraction: float, phantom_subjects: int, progress: bool = False) -> SweepData:
    """Load the sweep's data from ``out`` if prepared with the same settings, else prepare and save it.

    A sweep folder holds one data set: asking for other data settings there is an error,
    so that resumed trials are comparable with the finished ones.
    """
    out = open_sweep_folder(out)
    wanted = {"data": str(Path(data).resolve()) if data is not None else None, "image_size": image_size,
              "max_images": max_images, "seed": seed, "val_fraction": val_fraction,
              "phantom_subjects": phantom_subjects if data is None else None}
    settings_path, data_path = out / SETTINGS_FILE, out / DATA_FILE
    if settings_path.is_file() and data_path.is_file():
        saved = json.loads(settings_path.read_text())["data"]
        if saved != wanted:
            diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            raise ValueError(f"{out} holds a sweep prepared with other data settings {diff} (saved, asked); "
                             "use another --out folder or the same settings to resume")
        return SweepData.load(data_path)
    if data is None:
        data = out / "phantom"
        if not (data / "subjects.csv").is_file():
            from ..data.phantom import generate_cohort

            generate_cohort(data, subjects=phantom_subjects, seed=seed, resolution=2, progress=progress)
    from ..data.brats import find_brats_cases
    from ..models.training_data import load_training_data

    cohort = bool(find_brats_cases(data)) if Path(data).is_dir() else False
    # cohort slices are loaded at the cohort's own in-plane size, then resized like image-folder images
    loaded = load_training_data(data, task="classify", slices=cohort, size=None if cohort else image_size,
                                val_fraction=val_fraction, seed=seed, progress=progress)
    prepared = SweepData.from_training_data(loaded, image_size, str(data), max_images=max_images, seed=seed)
    prepared.save(data_path)
    with atomic_file(settings_path) as tmp:
        Path(tmp).write_text(json.dumps({"data": wanted}, indent=2) + "\n")
    return prepared


def run_grid_sweep(settings: SweepSettings, workers: int = 1, progress_bar=None,
                   baseline: float | None = None) -> SweepOutcome:
    """Run (or resume) the grid, then write the tables, figures and the best model into ``settings.out``.

    ``baseline``: validation accuracy of a constant majority-class predictor, written
    beside every trial's accuracy (default: computed from the sweep's data file).
    """
    out = open_sweep_folder(settings.out)
    if baseline is None:
        baseline = SweepData.load(settings.data_file).majority_baseline()
    study = run_sweep(settings, workers=workers, progress_bar=progress_bar)
    grid = settings.grid
    results = collect_results(study, grid)
    missing = grid_status(study, grid)["missing"]
    if missing:
        raise RuntimeError(f"the sweep ended with {len(missing)} configuration(s) unfinished: {missing[:5]}; "
                           "re-run the same command to resume")
    best = best_result(results)
    files = [write_trials_csv(results, out / "trials.csv", baseline=baseline),
             write_histories(results, out / "histories.json")]
    files += plot_block_grids(results, grid, out, baseline=baseline)
    files.append(plot_summary(results, out, baseline=baseline))
    best_model = out / "best_model"
    local = out / "trials" / best.config
    if local.is_dir():
        with atomic_dir(best_model, kind="checkpoint") as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
        files.append(best_model)
    else:  # trained by a worker on another machine sharing the storage
        where = out / "best_model.json"
        with atomic_file(where) as tmp:
            Path(tmp).write_text(json.dumps({"config": best.config, "trial": best.trial, "host": best.host,
                                             "checkpoint": best.checkpoint}, indent=2) + "\n")
        files.append(where)
        best_model = Path(best.checkpoint) if best.checkpoint else where
    return SweepOutcome(results=results, best=best, best_model=best_model, files=files, baseline=baseline)
