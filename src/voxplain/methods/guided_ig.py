"""Guided integrated gradients (Kapishnikov et al. 2021), with PAIR saliency's semantics.

Instead of the straight line, the path from the baseline to the input is chosen
step by step: at step k the features whose gradient is smallest in magnitude move
toward the input first, so the path avoids regions of high, noisy gradient. Every
feature stays within ``max_dist`` (as a fraction of its own baseline-to-input
distance) of the straight-line point at alpha = k / steps, and after each step the
L1 distance to the input has shrunk by exactly 1 / steps of the total. Attribution
accumulates gradient x (change of the path point).

All rows are walked together on the engine's device; the path state is float64
(as in the reference) and the model sees float32 points.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .base import Attribution, Method
from .baselines import BaselineSpec, check_baseline, resolve_baseline
from .completeness import report_completeness
from .integrated_gradients import check_steps
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["GuidedIG", "guided_integrated_gradients"]

# Tolerance (relative and absolute) for "the L1 distance has reached its target".
_EPSILON = 1e-9
# The largest finite float64: a threshold no finite |gradient| exceeds.
_LARGEST = torch.finfo(torch.float64).max


def _check_unit_interval(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _isclose(a: float, b: float) -> bool:
    """``math.isclose(a, b, rel_tol=_EPSILON, abs_tol=_EPSILON)``, as the reference tests it."""
    return abs(a - b) <= max(_EPSILON * max(abs(a), abs(b)), _EPSILON)


def _kth_smallest(values: Tensor, k: int) -> list[float]:
    """The ``k``-th smallest value of each row of ``values`` (N, M): numpy's introselect on the CPU, where it
    takes about half of ``torch.kthvalue``'s time; elsewhere ``kthvalue``."""
    if values.device.type == "cpu":
        return np.partition(values.numpy(), k - 1, axis=1)[:, k - 1].tolist()
    return values.kthvalue(k, dim=1).values.tolist()


def guided_integrated_gradients(run: "Run", baseline: BaselineSpec | Tensor = "zeros", steps: int = 200,
                                fraction: float = 0.25, max_dist: float = 0.02) -> tuple[Tensor, Tensor]:
    """Guided IG of ``run.target`` for every row of ``run.x``: (N, C, *spatial), and F(baseline) per row.

    Args:
        run: the rows to explain and their engine and target.
        baseline: a baseline option (see :mod:`voxplain.methods.baselines`) or a tensor.
        steps: number of path steps (one gradient evaluation each).
        fraction: share of the features, those with the smallest |gradient|, moved per iteration.
        max_dist: how far (in alpha) a feature may run ahead of the straight-line point;
            0 gives IG with the left Riemann rule, as does ``fraction=1``.

    F(baseline) is the score of the first path point, so it costs nothing.
    """
    steps = check_steps(steps)
    fraction = _check_unit_interval(fraction, "fraction")
    max_dist = _check_unit_interval(max_dist, "max_dist")
    shape = run.x.shape
    x_in = run.x.detach().to(torch.float64).flatten(1)
    x_base = resolve_baseline(baseline, run.x, run.sample_index, run.n_samples).to(torch.float64).flatten(1)
    diff = x_in - x_base
    l1_total = diff.abs().sum(dim=1)
    live = l1_total > 0  # a row equal to its baseline gets zero attribution
    l1_totals, live_rows = l1_total.tolist(), live.tolist()
    n_features = x_in.shape[1]
    # numpy's quantile(..., method="lower") takes the element at floor((n - 1) * q).
    kth = math.floor((n_features - 1) * fraction) + 1

    def per_row(values: list) -> Tensor:  # one value per row, to broadcast over its features
        return torch.tensor(values, dtype=torch.float64, device=x_in.device).view(-1, 1)

    x = x_base.clone()
    attr = torch.zeros_like(x_in)
    f0: Tensor | None = None
    bar = run.engine.progress_bar(steps, "guided_ig")
    # The model exactly as it came: which features move next is decided by ranking |gradient|, so a
    # rounding difference can change the path (folded batch norms moved a 3D segmentation net's map
    # 1.7e-2 from PAIR's, against 1e-3 as the model came).
    with run.exact_model():
        try:
            for step in range(steps):
                grads = run.gradients(x.to(run.x.dtype).view(shape), run.sample_index)
                grad = grads.inputs.to(torch.float64).flatten(1)
                if f0 is None:
                    f0 = grads.scores.to(torch.float64)
                del grads
                alpha = (step + 1.0) / steps
                alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
                x_min = torch.add(x_base, diff, alpha=alpha_min)
                x_max = torch.add(x_base, diff, alpha=alpha_max)
                targets = [t * (1 - (step + 1) / steps) for t in l1_totals]
                x_start = x
                # Features whose alpha fell behind alpha_min catch up to it (x - x_min points away
                # from the input). Later iterations of this step only move features forward, so once is enough.
                x = torch.where(((x - x_min) * diff < 0) & live[:, None], x_min, x)
                # |gradient| of the features still free to move; inf marks those that are not.
                magnitude = grad.abs()
                active = live_rows
                # The per-row bookkeeping is in Python floats (IEEE doubles, as the tensors' float64): one
                # value per row, where tensor operations would cost more in dispatch than in arithmetic.
                while True:
                    currents = torch.linalg.vector_norm(x - x_in, ord=1, dim=1).tolist()
                    going = [a and not _isclose(t, c) for a, t, c in zip(active, targets, currents)]
                    if not any(going):
                        break
                    # Move the fraction of free features with the smallest |gradient| toward x_max.
                    magnitude.masked_fill_(x == x_max, math.inf)
                    # (a row whose threshold is inf has no finite feature below it: select none of the inf ones)
                    thresholds = [min(v, _LARGEST) if g else -math.inf
                                  for v, g in zip(_kth_smallest(magnitude, kth), going)]
                    selected = magnitude <= per_row(thresholds)
                    gap = (x_max - x) * selected
                    l1_selected = torch.linalg.vector_norm(gap, ord=1, dim=1).tolist()
                    gammas = [(c - t) / max(sel, 1e-300) if sel > 0 else math.inf
                              for c, t, sel in zip(currents, targets, l1_selected)]
                    # gamma > 1: the selected features alone cannot close the gap, so they go
                    # all the way to x_max and the next fraction is selected; else part way.
                    jumps = [g > 1.0 for g in gammas]
                    if all(jumps):
                        moved = x_max
                    else:
                        moved = torch.addcmul(x, gap, per_row([g if not j else 0.0 for g, j in zip(gammas, jumps)]))
                        if any(jumps):
                            moved = torch.where(per_row(jumps) > 0, x_max, moved)
                    x = torch.where(selected, moved, x)
                    # The reference loops forever when nothing is left to move; stop instead.
                    active = [g and j and sel > 0 for g, j, sel in zip(going, jumps, l1_selected)]
                    if not any(active):
                        break
                # The gradient is fixed within a step, so the step's moves add up to one product.
                attr.addcmul_(x - x_start, grad)
                bar.update(1)
        finally:
            bar.close()
    return attr.to(run.x.dtype).view(shape), f0


@register
class GuidedIG(Method):
    """Guided integrated gradients (Kapishnikov et al. 2021), as PAIR saliency's ``GuidedIG``.

    Args:
        steps: number of path steps (one gradient evaluation each).
        fraction: share of the features moved per iteration, those with the smallest |gradient|.
        max_dist: the largest deviation from the straight path, as a fraction in [0, 1] of
            the baseline-to-input distance; 0 (or ``fraction=1``) gives IG with ``riemann_left``.
        baseline: as for integrated gradients (``"zeros"`` default, ``"min"``, ``"max"``,
            ``"blur"``, a number or a tensor).

    Reports its completeness error per sample in ``extras["completeness"]`` and warns
    (naming the likely cause) when it is above 5%.
    """

    name = "guided_ig"

    def __init__(self, steps: int = 200, fraction: float = 0.25, max_dist: float = 0.02,
                 baseline: BaselineSpec = "zeros"):
        self.steps = check_steps(steps)
        self.fraction = _check_unit_interval(fraction, "fraction")
        self.max_dist = _check_unit_interval(max_dist, "max_dist")
        self.baseline = check_baseline(baseline)

    def attribute(self, run: "Run") -> Attribution:
        attr, f0 = guided_integrated_gradients(run, self.baseline, self.steps, self.fraction, self.max_dist)
        result = Attribution(attr)
        if not run.derived:
            report_completeness(result, run, attr, f0, method=self.name, steps=self.steps)
        return result
