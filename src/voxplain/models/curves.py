"""Learning curves: loss and the task's metric per epoch, as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file

__all__ = ["plot_history"]


def plot_history(history: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot train/validation loss and accuracy or Dice per region against epoch; write ``path`` atomically."""
    if not history:
        raise ValueError("the training history is empty; nothing to plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    metrics = [k for k in history[0] if k.endswith("_accuracy") or "_dice_" in k]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for key in ("train_loss", "val_loss"):
        if key in history[0]:
            ax_loss.plot(epochs, [r[key] for r in history], marker="o", label=key.replace("_", " "))
    for key in metrics:
        style = "--" if key.startswith("train") else "-"
        ax_metric.plot(epochs, [r[key] for r in history], style, marker=".", label=key.replace("_", " "))
    kept = [r["epoch"] for r in history if r.get("kept")]
    for ax, ylabel in ((ax_loss, "loss"), (ax_metric, "accuracy / Dice")):
        for epoch in kept:
            ax.axvline(epoch, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_metric.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
