"""Integrated gradients (Sundararajan et al. 2017) with Captum's quadrature rules.

IG(x) = (x - x0) * integral_0^1 dF/dx(x0 + a (x - x0)) da, approximated by
sum_j w_j dF/dx(x0 + a_j (x - x0)). The path points of all rows are evaluated in
chunks that fit one pass (:meth:`voxplain.run.Run.row_chunks`), so B x steps x C x
voxels never sits in memory at once (3D volumes); each chunk's weighted gradients
are added into an (N, C, *spatial) sum.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .base import Attribution, Method
from .baselines import BaselineSpec, check_baseline, resolve_baseline
from .completeness import completeness, report_completeness
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["IntegratedGradients", "integrated_gradients", "auto_integrated_gradients", "quadrature", "RULES",
           "check_steps", "check_rule", "check_tolerance", "MAX_STEPS", "MAX_GAUSS_LEGENDRE_STEPS"]

#: Quadrature rules, named as in Captum's ``IntegratedGradients(method=...)``.
RULES = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")
#: The most path points, samples or steps any method takes per input: far beyond any useful accuracy
#: (path integrals converge within a few hundred points), and small enough that the per-point
#: bookkeeping (positions, weights, progress) stays a few megabytes.
MAX_STEPS = 100_000
#: Gauss-Legendre nodes come from an eigenvalue problem of size steps x steps (numpy, as Captum):
#: O(steps^2) memory and O(steps^3) time.
MAX_GAUSS_LEGENDRE_STEPS = 1024


def check_steps(steps, name: str = "steps", minimum: int = 1, maximum: int = MAX_STEPS) -> int:
    """``steps`` as an int in [``minimum``, ``maximum``], or a clear error."""
    if isinstance(steps, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got a bool")
    try:
        value = operator.index(steps)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {steps!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name}={value} is more than the limit of {maximum}; results stop changing long "
                         "before that, while time and memory keep growing with it")
    return value


def check_rule(rule: str, steps: int) -> str:
    """Validate the quadrature ``rule`` (and that it can use ``steps`` points)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    if rule == "riemann_trapezoid" and steps < 2:
        raise ValueError(f"rule 'riemann_trapezoid' needs steps >= 2 (both end points), got {steps}")
    if rule == "gausslegendre" and steps > MAX_GAUSS_LEGENDRE_STEPS:
        raise ValueError(f"rule 'gausslegendre' takes at most {MAX_GAUSS_LEGENDRE_STEPS} steps (its nodes cost "
                         f"O(steps^3) to compute), got {steps}; it converges fast, or use a riemann rule for more")
    return rule


def quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Path positions ``alphas`` in [0, 1] and their weights for ``steps`` points.

    The numbers are Captum's (``captum.attr._utils.approximation_methods``) so that
    results agree: Riemann rules use weights 1/steps at float32 ``linspace``
    positions; ``riemann_trapezoid`` places the points at both ends and halves the
    two end weights (so, as in Captum, its weights sum to (steps - 1) / steps, not 1);
    ``gausslegendre`` uses the Gauss-Legendre nodes and weights mapped to [0, 1].
    """
    check_rule(rule, check_steps(steps))
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    weights = [1 / n] * n
    if rule == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif rule == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif rule == "riemann_right":
        alphas = torch.linspace(1 / n, 1, n)
    else:
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    return alphas.tolist(), weights


def integrated_gradients(run: "Run", baseline: BaselineSpec | Tensor = "zeros", steps: int = 50,
                         rule: str = "gausslegendre", desc: str = "integrated_gradients",
                         baseline_scores: bool = False) -> tuple[Tensor, Tensor | None]:
    """Integrated gradients of ``run.target`` for every row of ``run.x``: (N, C, *spatial).

    The reusable core of :class:`IntegratedGradients` (and of methods built on IG,
    such as XRAI's base attribution or SmoothGrad over IG).

    Args:
        run: the rows to explain and their engine and target.
        baseline: a baseline option (see :mod:`voxplain.methods.baselines`) or a tensor.
        steps: number of path points per row.
        rule: quadrature rule, one of :data:`RULES`.
        desc: label of the progress bar.
        baseline_scores: also return F(baseline) per row (for completeness): read from
            the path when the rule evaluates the baseline itself, else one forward pass.

    Returns:
        The map and F(baseline) (None unless ``baseline_scores``).
    """
    steps = check_steps(steps)
    check_rule(rule, steps)
    x0 = resolve_baseline(baseline, run.x, run.sample_index, run.n_samples)
    return _path_integral(run, x0, steps, rule, desc, baseline_scores)


def _path_integral(run: "Run", x0: Tensor, steps: int, rule: str, desc: str,
                   baseline_scores: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`integrated_gradients` from ``x0``, the baseline already resolved for the rows of ``run.x``."""
    x = run.x
    diff = x - x0
    alphas_list, weights_list = quadrature(rule, steps)
    alphas = torch.tensor(alphas_list, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights_list, dtype=x.dtype, device=x.device)
    view = (-1,) + (1,) * (x.ndim - 1)
    total = torch.zeros_like(x)
    at_baseline = alphas_list[0] == 0.0
    f0 = torch.empty(x.shape[0], dtype=torch.float64, device=x.device) if baseline_scores and at_baseline else None
    for chunk in run.row_chunks(steps, desc=desc):
        # one broadcast product per sample: no gathered copies of x0 and x - x0
        points = torch.cat([torch.addcmul(x0[r:r + 1], alphas[lo:hi].view(view), diff[r:r + 1])
                            for r, lo, hi in chunk.runs])
        grads = run.gradients(points, chunk.owner)
        del points
        chunk.add_per_sample(total, grads.inputs, weights)
        if f0 is not None:
            first = chunk.step == 0
            f0[chunk.sample[first]] = grads.scores[first].to(f0.dtype)
        del grads
    if baseline_scores and f0 is None:
        f0 = run.scores(x0, run.sample_index)
    return diff * total, f0


#: First and largest step counts of ``steps="auto"`` (doubling in between).
AUTO_FIRST_STEPS = 4
AUTO_MAX_STEPS = 256
#: Default completeness tolerance of ``steps="auto"`` (relative error).
AUTO_TOLERANCE = 0.01


def check_tolerance(tolerance) -> float:
    """``tolerance`` as a float in (0, 1), or a clear error."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) (a relative completeness error), got {tolerance!r}")
    return float(tolerance)


def auto_integrated_gradients(run: "Run", baseline: BaselineSpec | Tensor = "zeros", rule: str = "gausslegendre",
                              tolerance: float = AUTO_TOLERANCE, max_steps: int = AUTO_MAX_STEPS,
                              desc: str = "integrated_gradients") -> tuple[Tensor, Tensor, list[int], list[float]]:
    """Integrated gradients with the fewest steps (4, 8, 16, ... up to ``max_steps``) whose completeness
    error is at most ``tolerance``, chosen per sample.

    Each round runs IG at the next step count on the rows not yet within the tolerance
    only. No gradient is reused between rounds: the points of the Gauss-Legendre rule
    (and of the midpoint and trapezoid rules) for 2n steps are not those for n, so
    there is nothing to reuse; F(x) and F(baseline) are computed once.

    Returns:
        The map, F(baseline) per row, the steps used per row, and each row's completeness error.
    """
    x = run.x
    n_rows = x.shape[0]
    x0 = resolve_baseline(baseline, x, run.sample_index, run.n_samples)
    f0 = run.scores(x0, run.sample_index).to(torch.float64)
    fx = run.scores_at_x().to(torch.float64)
    attr = torch.zeros_like(x)
    steps_used = [0] * n_rows
    errors = [math.inf] * n_rows
    todo = torch.arange(n_rows, device=x.device)
    steps = min(AUTO_FIRST_STEPS, max_steps)
    while True:
        part = run if len(todo) == n_rows else run.at(x[todo], run.sample_index[todo])
        found, _ = _path_integral(part, x0[todo], steps, rule, f"{desc} ({steps} steps)")
        attr[todo] = found
        info = completeness(found, fx[todo], f0[todo])
        done = []
        for k, (row, error) in enumerate(zip(todo.tolist(), info["error"])):
            steps_used[row], errors[row] = steps, error
            done.append(error <= tolerance)
        if all(done) or 2 * steps > max_steps:
            return attr, f0, steps_used, errors
        todo = todo[~torch.tensor(done, device=x.device)]
        steps *= 2


@register
class IntegratedGradients(Method):
    """Integrated gradients along the straight path from a baseline to the input.

    Args:
        steps: number of path points (>= 1; >= 2 for ``riemann_trapezoid``), or ``"auto"``: the
            fewest of 4, 8, 16, ... (doubling, at most ``max_steps``) whose completeness error
            is at most ``tolerance``, per sample (reported in ``extras["steps_used"]``).
        rule: ``"gausslegendre"`` (default, as Captum), ``"riemann_trapezoid"``,
            ``"riemann_left"``, ``"riemann_right"`` or ``"riemann_middle"``; positions and
            weights as in Captum. Gauss-Legendre never evaluates the gradient at the
            baseline itself, where networks with InstanceNorm/GroupNorm can have an
            extreme gradient (the trapezoid and left rules do).
        baseline: ``"zeros"`` (default), ``"min"``, ``"max"``, ``"blur"``/``"blur:SIGMA"``,
            a number, or a tensor broadcastable to the input (see :mod:`voxplain.methods.baselines`).
        tolerance: with ``steps="auto"``, the relative completeness error to reach (default 0.01).
        max_steps: with ``steps="auto"``, the largest step count tried (default 256); a sample
            still above the tolerance there is reported (and warned about).

    Reports its completeness error per sample in ``extras["completeness"]`` and warns
    (naming the likely cause) when it is above 5% (above ``tolerance`` with ``"auto"``).
    """

    name = "integrated_gradients"

    def __init__(self, steps: int | str = 50, rule: str = "gausslegendre", baseline: BaselineSpec = "zeros",
                 tolerance: float = AUTO_TOLERANCE, max_steps: int = AUTO_MAX_STEPS):
        if steps == "auto":
            self.steps = "auto"
            self.max_steps = check_steps(max_steps, "max_steps", minimum=AUTO_FIRST_STEPS)
            self.rule = check_rule(rule, self.max_steps)  # every count tried, up to max_steps, must suit it
        else:
            if isinstance(steps, str):
                raise ValueError(f"steps must be an int >= 1 or 'auto', got {steps!r}")
            self.steps = check_steps(steps)
            self.max_steps = check_steps(max_steps, "max_steps")
            self.rule = check_rule(rule, self.steps)
        self.baseline = check_baseline(baseline)
        self.tolerance = check_tolerance(tolerance)

    def options(self) -> dict[str, Any]:
        """As given or defaulted; ``tolerance`` and ``max_steps`` only with ``steps="auto"`` (they act only then)."""
        out = super().options()
        if self.steps != "auto":
            out.pop("tolerance", None)
            out.pop("max_steps", None)
        return out

    def attribute(self, run: "Run") -> Attribution:
        if self.steps == "auto":
            attr, f0, used, _ = auto_integrated_gradients(run, self.baseline, self.rule, self.tolerance,
                                                          self.max_steps, desc=self.name)
            result = Attribution(attr, {"steps_used": used, "tolerance": self.tolerance})
            if not run.derived:
                report_completeness(result, run, attr, f0, method=self.name, steps=max(used), rule=self.rule,
                                    tolerance=self.tolerance, capped=max(used) * 2 > self.max_steps)
            return result
        # rows derived from the input (SmoothGrad's noisy copies) get no completeness check
        attr, f0 = integrated_gradients(run, self.baseline, self.steps, self.rule, desc=self.name,
                                        baseline_scores=not run.derived)
        result = Attribution(attr)
        if f0 is not None:
            report_completeness(result, run, attr, f0, method=self.name, steps=self.steps, rule=self.rule)
        return result
