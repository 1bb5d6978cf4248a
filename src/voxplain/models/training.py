"""Seeded training loops for the zoo's classifiers and region-segmentation networks.

``train`` runs Adam for a number of epochs and returns the per-epoch history:

* ``task="classify"``: cross-entropy on class indices; accuracy.
* ``task="segment"``: soft Dice + binary cross-entropy on sigmoid region channels
  (TC, WT, ET by default: ``voxplain.data.preprocess.REGIONS``); Dice per region on the validation set, averaged over
  cases, a case with an empty region and an empty prediction counting as 1 (BraTS convention).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import REGIONS
from ..targets import BRATS_LABELS

__all__ = ["train", "evaluate", "TASKS", "LR_SCHEDULES", "dice_per_case", "soft_dice_loss", "labels_to_region_channels"]

TASKS = ("classify", "segment")
#: learning-rate schedules of :func:`train`
LR_SCHEDULES = ("constant", "cosine")


def labels_to_region_channels(labels: Tensor, region_names: Sequence[str]) -> Tensor:
    """BraTS label map(s) (B, *spatial) or (B, 1, *spatial) -> float region channels (B, R, *spatial)."""
    if labels.ndim >= 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return torch.stack([torch.isin(labels, torch.tensor(BRATS_LABELS[r], device=labels.device))
                        for r in region_names], dim=1).float()


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice of sigmoid(logits) vs target, per case and channel, averaged."""
    prob = torch.sigmoid(logits).flatten(2)
    target = target.flatten(2)
    inter = (prob * target).sum(-1)
    denom = prob.sum(-1) + target.sum(-1)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def dice_per_case(pred: Tensor, target: Tensor) -> Tensor:
    """Hard Dice per case and channel, (B, R); both empty -> 1."""
    pred, target = pred.flatten(2).bool(), target.flatten(2).bool()
    inter = (pred & target).sum(-1).float()
    total = (pred.sum(-1) + target.sum(-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


class _Objective:
    """Loss and metrics of one task, accumulated over batches."""

    def __init__(self, task: str, region_names: Sequence[str]):
        self.task = task
        self.region_names = list(region_names)

    def prepare_target(self, y) -> Tensor:
        """Class indices (B,), or float region channels (B, R, *spatial) from channels or a label map."""
        y = torch.as_tensor(y)
        if self.task == "classify":
            return y.long().reshape(-1)
        if y.is_floating_point():
            return y.float()
        return labels_to_region_channels(y.long(), self.region_names)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "classify":
            return F.cross_entropy(out, y)
        if out.shape != y.shape:
            raise ValueError(f"segmentation output {tuple(out.shape)} and region target {tuple(y.shape)} differ; "
                             f"the model needs {y.shape[1]} output channels ({', '.join(self.region_names)})")
        return soft_dice_loss(out, y) + F.binary_cross_entropy_with_logits(out, y)

    def new_totals(self) -> dict:
        return {"loss": 0.0, "n": 0, "correct": 0, "dice": []}

    def accumulate(self, totals: dict, out: Tensor, y: Tensor, loss: Tensor) -> None:
        n = y.shape[0]
        totals["loss"] += float(loss) * n
        totals["n"] += n
        if self.task == "classify":
            totals["correct"] += int((out.argmax(1) == y).sum())
        else:
            totals["dice"].append(dice_per_case(out.detach() > 0, y > 0.5).cpu())

    def summary(self, totals: dict, prefix: str) -> dict:
        n = max(totals["n"], 1)
        rec = {f"{prefix}_loss": totals["loss"] / n}
        if self.task == "classify":
            rec[f"{prefix}_accuracy"] = totals["correct"] / n
        elif totals["dice"]:
            dice = torch.cat(totals["dice"]).mean(0)
            for name, d in zip(self.region_names, dice.tolist()):
                rec[f"{prefix}_dice_{name}"] = d
            rec[f"{prefix}_dice_mean"] = float(dice.mean())
        return rec

    def score_key(self, prefix: str) -> str:
        """The metric (higher is better) used to pick the best epoch."""
        return f"{prefix}_accuracy" if self.task == "classify" else f"{prefix}_dice_mean"


def _batches(loader: DataLoader, device, objective: _Objective):
    for x, y in loader:
        x = x.to(device, torch.float32)
        if x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        yield x, objective.prepare_target(y).to(device)


def _volume_layout(model: nn.Module, on: bool) -> None:
    """Switch 3D models to channels-last memory (and back).

    On CPU, channels-first 3D convolution backward falls back to a slow path;
    channels-last makes 3D training several times faster and changes no values
    beyond float rounding. State dicts are saved in the ordinary layout.
    """
    if any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in model.modules()):
        model.to(memory_format=torch.channels_last_3d if on else torch.contiguous_format)


def evaluate(model: nn.Module, dataset: Dataset, task: str, batch_size: int = 4, device=None,
             region_names: Sequence[str] = REGIONS) -> dict:
    """Loss and accuracy (classify) or Dice per region (segment) of ``model`` on ``dataset``."""
    objective = _Objective(_check_task(task), region_names)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _run_eval(model, DataLoader(dataset, batch_size=batch_size), objective, device, "val")


def _run_eval(model, loader, objective, device, prefix) -> dict:
    model.eval()
    totals = objective.new_totals()
    with torch.no_grad():
        for x, y in _batches(loader, device, objective):
            out = model(x)
            objective.accumulate(totals, out, y, objective.loss(out, y))
    return objective.summary(totals, prefix)


def _train_epoch(model, loader, optimiser, objective, device, desc: str, progress: bool) -> dict:
    from tqdm.auto import tqdm

    model.train()
    totals = objective.new_totals()
    with tqdm(total=len(loader), desc=desc, disable=not progress, leave=False) as bar:
        for x, y in _batches(loader, device, objective):
            optimiser.zero_grad(set_to_none=True)
            out = model(x)
            loss = objective.loss(out, y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged ({desc}, loss {float(loss)}); try a lower learning rate")
            loss.backward()
            optimiser.step()
            objective.accumulate(totals, out.detach(), y, loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss'] / max(totals['n'], 1):.4f}")
    return objective.summary(totals, "train")


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


def _epoch_lr(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of ``epoch`` (1-based) of ``epochs`` under ``schedule``."""
    if schedule == "constant" or epochs == 1:
        return float(lr)
    floor = lr / 20
    return float(floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / (epochs - 1))))


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def train(model: nn.Module, train_ds: Dataset, val_ds: Dataset | None = None, task: str = "classify",
          epochs: int = 10, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, progress: bool = True,
          on_epoch_end: Callable[[dict], object] | None = None, device=None, weight_decay: float = 0.0,
          region_names: Sequence[str] = REGIONS, keep: str = "final",
          time_limit: float | None = None, clock: Callable[[], float] = time.perf_counter,
          lr_schedule: str = "constant") -> list[dict]:
    """Train ``model`` in place with Adam; returns the history, one dict per epoch.

    Each record has ``epoch``, ``seconds``, ``train_loss`` and (with ``val_ds``) ``val_loss``
    plus ``*_accuracy`` (classify) or ``val_dice_<region>`` / ``val_dice_mean`` (segment).
    Datasets yield ``(image (C, *spatial), target)``; a segmentation target is a BraTS
    label map or float region channels in ``region_names`` order.

    ``seed`` fixes dropout and the shuffling order (seed the model's initialisation
    yourself, before building it). ``on_epoch_end(record)`` is called after every epoch
    (it may raise, e.g. to prune an Optuna trial). ``keep="best"`` restores the weights
    of the epoch with the best validation score at the end, ties broken by the lower
    validation loss (``"final"`` keeps the last);
    the chosen epoch is marked ``"kept": True``. With ``time_limit`` (seconds) training
    stops early when another epoch as long as the last would end past the limit, as measured
    by ``clock`` (wall time by default; a benchmark on a shared machine may pass CPU time).
    ``lr_schedule="cosine"`` lowers the learning rate from ``lr`` along a half cosine to
    ``lr / 20`` in the last epoch (set once per epoch); ``"constant"`` keeps ``lr``.
    """
    objective = _Objective(_check_task(task), region_names)
    if keep not in ("best", "final"):
        raise ValueError(f"keep must be 'best' or 'final', got {keep!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if int(epochs) < 1 or int(batch_size) < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs!r}, {batch_size!r}, {lr!r}")
    if len(train_ds) == 0:
        raise ValueError("the training set is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    _volume_layout(model, True)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    # drop a last batch of one: BatchNorm cannot train on a single feature vector
    drop_last = len(train_ds) % int(batch_size) == 1 and len(train_ds) > 1
    loader = DataLoader(train_ds, batch_size=int(batch_size), shuffle=True, generator=shuffle, drop_last=drop_last)
    val_loader = DataLoader(val_ds, batch_size=int(batch_size)) if val_ds is not None and len(val_ds) else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    from tqdm.auto import tqdm

    history: list[dict] = []
    best_score, best_state, best_epoch = None, None, None
    began = clock()
    try:
        for epoch in range(1, int(epochs) + 1):
            start, tick = time.perf_counter(), clock()
            desc = f"epoch {epoch}/{epochs}"
            epoch_lr = _epoch_lr(lr, epoch, int(epochs), lr_schedule)
            for group in optimiser.param_groups:
                group["lr"] = epoch_lr
            record = {"epoch": epoch, "lr": epoch_lr,
                      **_train_epoch(model, loader, optimiser, objective, device, desc, progress)}
            if val_loader is not None:
                record.update(_run_eval(model, val_loader, objective, device, "val"))
            record["seconds"] = time.perf_counter() - start
            prefix = "val" if val_loader is not None else "train"
            score = record.get(objective.score_key(prefix))
            if score is not None:
                # equal scores (e.g. accuracy 1.0 on a small validation set): the lower loss wins
                score = (score, -record[f"{prefix}_loss"])
            if keep == "best" and score is not None and (best_score is None or score > best_score):
                best_score, best_epoch = score, epoch
                best_state = _state_copy(model)
            history.append(record)
            if progress:
                tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in record.items()))
            if on_epoch_end is not None:
                on_epoch_end(dict(record))
            if time_limit is not None and 2 * clock() - tick - began > time_limit:
                break
    finally:
        _volume_layout(model, False)
        model.eval()
    if keep == "best" and best_state is not None:
        model.load_state_dict(best_state)
    kept = best_epoch if keep == "best" and best_epoch is not None else history[-1]["epoch"]
    for record in history:
        record["kept"] = record["epoch"] == kept
    return history
