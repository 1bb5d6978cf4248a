"""Collect the sweep's finished trials into one row per configuration, and write them."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..atomic import atomic_file
from .grid import SweepGrid, config_key

__all__ = ["TrialResult", "collect_results", "write_trials_csv", "write_histories", "best_result", "CSV_COLUMNS"]

CSV_COLUMNS = ["config", "blocks", "batch_size", "learning_rate", "best_val_accuracy", "final_val_accuracy",
               "majority_baseline", "beats_baseline", "best_epoch", "epochs", "seconds", "trial", "diverged", "host"]


@dataclass
class TrialResult:
    """The outcome of one configuration: its first COMPLETE trial."""

    config: str
    blocks: int
    batch_size: int
    learning_rate: float
    best_val_accuracy: float
    final_val_accuracy: float
    best_epoch: int
    epochs: int
    seconds: float
    trial: int
    diverged: bool
    host: str = ""
    checkpoint: str = ""
    history: list[dict] = field(default_factory=list)


def collect_results(study: optuna.Study, grid: SweepGrid) -> list[TrialResult]:
    """One result per configuration of ``grid`` that has a COMPLETE trial, in grid order."""
    first: dict[str, optuna.trial.FrozenTrial] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        first.setdefault(config_key(t.params), t)
    results = []
    for config in grid.configurations():
        t = first.get(config_key(config))
        if t is None:
            continue
        history = t.user_attrs.get("history", [])
        val = [r["val_accuracy"] for r in history]
        best_epoch = history[val.index(max(val))]["epoch"] if val else 0
        results.append(TrialResult(
            config=config_key(config), blocks=config["blocks"], batch_size=config["batch_size"],
            learning_rate=config["learning_rate"], best_val_accuracy=max(val, default=0.0),
            final_val_accuracy=val[-1] if val else 0.0, best_epoch=best_epoch, epochs=len(history),
            seconds=float(t.user_attrs.get("seconds", 0.0)), trial=t.number,
            diverged=bool(t.user_attrs.get("diverged")), host=t.user_attrs.get("host", ""),
            checkpoint=t.user_attrs.get("checkpoint", ""), history=history))
    return results


def best_result(results: list[TrialResult]) -> TrialResult:
    """The configuration with the best validation accuracy (ties: fewer blocks, then earlier in the grid)."""
    if not results:
        raise ValueError("no finished trials")
    return max(results, key=lambda r: (r.best_val_accuracy, -r.blocks))


def write_trials_csv(results: list[TrialResult], path: str | Path, baseline: float | None = None) -> Path:
    """``trials.csv``: one row per configuration (history left out; see ``histories.json``).

    ``baseline`` (the validation accuracy of always predicting the majority class) is
    written beside each accuracy, with whether the trial beats it.
    """
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for r in results:
                row = asdict(r)
                row["majority_baseline"] = "" if baseline is None else round(baseline, 6)
                row["beats_baseline"] = "" if baseline is None else r.best_val_accuracy > baseline + 1e-9
                writer.writerow({k: row[k] for k in CSV_COLUMNS})
    return Path(path)


def write_histories(results: list[TrialResult], path: str | Path) -> Path:
    """``histories.json``: per-epoch train/validation loss and accuracy of every configuration."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps({r.config: r.history for r in results}, indent=1) + "\n")
    return Path(path)
