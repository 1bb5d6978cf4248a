"""Does the map find what the model uses? Deletion and insertion curves.

Voxels are ranked by the map's relevance (channels summed, ``reduce="abs"`` by
default; all channels of a voxel move together). *Deletion* replaces the most
relevant voxels of the input by a baseline, a growing fraction at a time, and
records the target score; a faithful map makes the score fall fast (low AUC).
*Insertion* starts from the baseline and reveals the most relevant voxels first;
a faithful map makes the score rise fast (high AUC). Fractions are
0, 1/steps, ..., 1; the AUC is the trapezoid area over the fraction axis
(0..1), in the units of the target score (use ``ClassTarget(output="probability")``
for scores in [0, 1]). All rows of all samples go through the engine in
batched, memory-budgeted forward passes.

Baselines: ``"zero"``, ``"mean"`` (per sample and channel), ``"blur"`` (the
input Gaussian-blurred over space with ``blur_sigma`` voxels), a number, or a
tensor broadcastable to the input.

Degenerate input: ties in relevance (e.g. a constant or all-zero map) are
broken by a seeded random order, so a constant map behaves like a random
ordering and the curves are reproducible for a given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import as_map, voxel_relevance
from ..methods.blur_ig import gaussian_blur
from ..run import Run, open_run

__all__ = ["PerturbationCurves", "perturbation_curves", "deletion", "insertion", "make_baseline",
           "relevance_order"]

MODES = ("deletion", "insertion")


@dataclass
class PerturbationCurves:
    """Per-sample curves: ``scores[b, k]`` is the score with ``fractions[k]`` of the voxels changed."""

    mode: str
    fractions: np.ndarray  # (S+1,)
    scores: np.ndarray  # (B, S+1)
    auc: np.ndarray  # (B,)

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return {"mode": self.mode, "fractions": self.fractions.tolist(), "scores": self.scores.tolist(),
                "auc": self.auc.tolist()}


def make_baseline(x: Tensor, baseline="zero", blur_sigma: float = 5.0) -> Tensor:
    """The baseline tensor (same shape as ``x``) named by ``baseline``."""
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(x.device, x.dtype), x.shape).clone()
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input "
                             f"shape {tuple(x.shape)}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x).clone()
    if baseline == "blur":
        return gaussian_blur(x, blur_sigma)
    raise ValueError(f"baseline must be 'zero', 'mean', 'blur', a number or a tensor, got {baseline!r}")


def relevance_order(relevance: Tensor, seed: int = 0) -> Tensor:
    """Ranks (B, V): ``ranks[b, v]`` is voxel v's position, 0 = most relevant; ties in seeded random order."""
    flat = relevance.reshape(relevance.shape[0], -1).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    ranks = np.empty(flat.shape, dtype=np.int64)
    for i, row in enumerate(flat):
        order = np.lexsort((rng.random(row.size), -row))
        ranks[i, order] = np.arange(row.size)
    return torch.from_numpy(ranks)


def _check_map(attribution: Tensor, x: Tensor) -> None:
    if attribution.shape[0] != x.shape[0] or attribution.shape[2:] != x.shape[2:]:
        raise ValueError(f"attribution of shape {tuple(attribution.shape)} does not match the input of shape "
                         f"{tuple(x.shape)}: expected (B, C or 1, *spatial) with the same B and spatial size")


def curves_on(p: Run, attribution, mode: str = "deletion", steps: int = 20, baseline="zero",
              blur_sigma: float = 5.0, reduce: str = "abs", seed: int = 0) -> PerturbationCurves:
    """Deletion or insertion curves with an already prepared engine and bound target."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    a = as_map(attribution)
    x = p.x
    _check_map(a, x)
    b = x.shape[0]
    spatial = tuple(x.shape[2:])
    n_vox = int(np.prod(spatial))
    ranks = relevance_order(voxel_relevance(a, reduce), seed).to(x.device)
    base = make_baseline(x, baseline, blur_sigma)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.as_tensor(np.round(fractions * n_vox).astype(np.int64), device=x.device)
    # every (sample, step) pair is one row; rows are built and scored a chunk at a time
    sample_of_row = torch.arange(b, device=x.device).repeat_interleave(steps + 1)
    step_of_row = torch.arange(steps + 1, device=x.device).repeat(b)
    scores = torch.empty(b * (steps + 1), dtype=torch.float64)
    engine = p.engine
    bar = engine.progress_bar(b * (steps + 1), f"{mode} curves")
    for sl in engine.chunks(len(sample_of_row), x.shape[1:], backward=False):
        s_idx, k_idx = sample_of_row[sl], step_of_row[sl]
        changed = (ranks[s_idx] < counts[k_idx, None]).reshape(-1, 1, *spatial)
        if mode == "deletion":
            rows = torch.where(changed, base[s_idx], x[s_idx])
        else:
            rows = torch.where(changed, x[s_idx], base[s_idx])
        scores[sl] = p.scores(rows, p.sample_index[s_idx]).double().cpu()
        bar.update(len(s_idx))
    bar.close()
    curve = scores.reshape(b, steps + 1).numpy()
    auc = np.trapezoid(curve, fractions, axis=1) if hasattr(np, "trapezoid") else np.trapz(curve, fractions, axis=1)
    return PerturbationCurves(mode, fractions, curve, auc)


def perturbation_curves(model: nn.Module, x, attribution, target=None, mode: str = "deletion",
                        steps: int = 20, baseline="zero", blur_sigma: float = 5.0, reduce: str = "abs",
                        seed: int = 0, device=None, batch_size: int | None = None,
                        memory_budget=None, progress: bool = False) -> PerturbationCurves:
    """Deletion or insertion curves of ``model`` at ``x`` (B, C, *spatial) for a map (B, C|1, *spatial).

    ``target`` is bound to the model's output on ``x`` as in :func:`voxplain.explain`
    (default: the predicted class); the model comes back unchanged.
    """
    with open_run(model, x, target, device=device, batch_size=batch_size, memory_budget=memory_budget,
                  progress=progress) as p:
        return curves_on(p, attribution, mode, steps, baseline, blur_sigma, reduce, seed)


def deletion(model: nn.Module, x, attribution, target=None, **kwargs) -> PerturbationCurves:
    """Deletion curves (most relevant voxels removed first; lower AUC = more faithful)."""
    return perturbation_curves(model, x, attribution, target, mode="deletion", **kwargs)


def insertion(model: nn.Module, x, attribution, target=None, **kwargs) -> PerturbationCurves:
    """Insertion curves (most relevant voxels revealed first; higher AUC = more faithful)."""
    return perturbation_curves(model, x, attribution, target, mode="insertion", **kwargs)
