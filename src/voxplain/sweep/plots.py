"""The sweep's figures: accuracy per epoch for each configuration (CXAI Figures 6-8) and a summary."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import atomic_file  # noqa: E402
from .grid import SweepGrid  # noqa: E402
from .results import TrialResult  # noqa: E402

__all__ = ["plot_block_grids", "plot_summary"]


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_block_grids(results: list[TrialResult], grid: SweepGrid, out: Path,
                     baseline: float | None = None) -> list[Path]:
    """One figure per block count: a batch size x learning rate grid of accuracy-per-epoch curves.

    ``baseline`` (majority-class accuracy) is drawn as a dashed line in every panel.
    """
    by_key = {(r.blocks, r.batch_size, r.learning_rate): r for r in results}
    paths = []
    for blocks in grid.blocks:
        rows, cols = len(grid.batch_sizes), len(grid.learning_rates)
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False,
                                 sharex=True, sharey=True)
        for i, bs in enumerate(grid.batch_sizes):
            for j, lr in enumerate(grid.learning_rates):
                ax = axes[i][j]
                r = by_key.get((blocks, bs, lr))
                if r is None or not r.history:
                    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                else:
                    epochs = [h["epoch"] for h in r.history]
                    ax.plot(epochs, [h["train_accuracy"] for h in r.history], "-o", ms=3, label="train")
                    ax.plot(epochs, [h["val_accuracy"] for h in r.history], "-s", ms=3, label="validation")
                    if r.diverged:
                        ax.text(0.5, 0.1, "diverged", ha="center", color="red", transform=ax.transAxes)
                if baseline is not None:
                    ax.axhline(baseline, color="grey", ls="--", lw=1, label="majority class")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(f"lr {lr:g}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"batch {bs}\naccuracy", fontsize=9)
                if i == rows - 1:
                    ax.set_xlabel("epoch", fontsize=9)
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"CNN with {blocks} conv blocks: accuracy per epoch")
        fig.tight_layout()
        paths.append(_save(fig, out / f"accuracy_blocks{blocks}.png"))
    return paths


def plot_summary(results: list[TrialResult], out: Path, baseline: float | None = None) -> Path:
    """Final validation accuracy against each hyper-parameter (one panel each).

    ``baseline``, the accuracy of always predicting the majority class, is drawn as a
    dashed line: a trial on or below it has learnt nothing a constant would not.
    """
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, key, label in zip(axes, ("blocks", "batch_size", "learning_rate"),
                              ("conv blocks", "batch size", "learning rate")):
        values = sorted({getattr(r, key) for r in results})
        pos = {v: i for i, v in enumerate(values)}
        xs = [pos[getattr(r, key)] for r in results]
        ax.scatter(xs, [r.final_val_accuracy for r in results], alpha=0.6, s=18, label="final")
        ax.scatter(xs, [r.best_val_accuracy for r in results], marker="_", s=120, c="k", label="best")
        if baseline is not None:
            ax.axhline(baseline, color="tab:red", ls="--", lw=1,
                       label=f"majority class ({baseline:.3f})")
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(fontsize=8)
    beaten = sum(r.best_val_accuracy > baseline + 1e-9 for r in results) if baseline is not None else None
    fig.suptitle("Sweep summary" + (f": {beaten} of {len(results)} trials beat the majority-class baseline"
                                    if beaten is not None else ""))
    fig.tight_layout()
    return _save(fig, out / "summary.png")
