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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .base import Attribution, Method
from .baselines import BaselineSpec, check_baseline, resolve_baseline
from .completeness import completeness, report_completeness
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["IntegratedGradients", "integrated_gradients", "auto_integrated_gradients", "AutoIG", "quadrature", "RULES", "ALL_RULES",
           "check_steps", "check_rule", "check_tolerance", "MAX_STEPS", "MAX_GAUSS_LEGENDRE_STEPS"]

#: Quadrature rules, named as in Captum's ``IntegratedGradients(method=...)``.
RULES = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")
#: Captum's rules and ``"nested"`` (see :func:`quadrature`), whose points for ``2 * (steps + 1) - 1``
#: steps include those for ``steps``.
ALL_RULES = RULES + ("nested",)
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
    if rule not in ALL_RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(ALL_RULES)}")
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

    ``nested`` is the trapezoid rule after Sidi's substitution alpha = t - sin(2 pi t) / (2 pi):
    points alpha(k / n), k = 1 .. n - 1 (n = steps + 1), weights alpha'(k / n) / n. The substitution
    makes the integrand vanish with its first derivative at both ends, so the trapezoid rule
    converges fast (O(n^-4) for a smooth integrand), its points cluster at the ends like
    Gauss-Legendre's, the end points themselves get weight 0 (the baseline is never evaluated),
    and doubling n keeps every point: ``steps="auto"`` reuses all gradients computed so far.
    """
    check_rule(rule, check_steps(steps))
    n = steps
    if rule == "nested":
        t = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        return _nested_alpha(t).tolist(), (_nested_slope(t) / (n + 1)).tolist()
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


def _nested_alpha(t: Tensor) -> Tensor:
    """Sidi's substitution alpha(t) = t - sin(2 pi t) / (2 pi) (the ``nested`` rule)."""
    return t - torch.sin(2 * math.pi * t) / (2 * math.pi)


def _nested_slope(t: Tensor) -> Tensor:
    """alpha'(t) = 1 - cos(2 pi t)."""
    return 1 - torch.cos(2 * math.pi * t)


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
    attr, f0, _ = _integrated_gradients(run, baseline, steps, rule, desc, baseline_scores)
    return attr, f0


def _integrated_gradients(run: "Run", baseline: BaselineSpec | Tensor, steps: int, rule: str, desc: str,
                          end_scores: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`integrated_gradients`, with ``end_scores`` also F(x) per row (None without)."""
    steps = check_steps(steps)
    check_rule(rule, steps)
    x0 = resolve_baseline(baseline, run.x, run.sample_index, run.n_samples)
    return _path_integral(run, x0, steps, rule, desc, end_scores)


def _path_integral(run: "Run", x0: Tensor, steps: int, rule: str, desc: str,
                   end_scores: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The IG map from ``x0`` (the baseline already resolved for the rows of ``run.x``) and, with
    ``end_scores``, F(x0) and F(x) per row: read from the path where the rule evaluates the end
    points, else from one forward pass over both (see :meth:`Run.scores_with_x`)."""
    x = run.x
    diff = x - x0
    alphas_list, weights_list = quadrature(rule, steps)
    total = torch.zeros_like(x)
    f0, fx = _weighted_gradients(run, x0, diff, alphas_list, weights_list, total, desc, end_scores)
    if end_scores and f0 is None:
        f0, found = run.scores_with_x(x0, run.sample_index)
        fx = found if fx is None else fx
    elif end_scores and fx is None:
        fx = run.scores_at_x()
    return diff * total, f0, fx


def _weighted_gradients(run: "Run", x0: Tensor, diff: Tensor, alphas_list: list[float], weights_list: list[float],
                        total: Tensor, desc: str, end_scores: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """``total[r] += sum_j weights[j] * dF/dx(x0[r] + alphas[j] * diff[r])`` for every row ``r`` of ``run.x``,
    in chunks that fit one pass; with ``end_scores``, F at the points with alpha 0 and 1 (None where
    the points do not include it)."""
    x = run.x
    steps = len(alphas_list)
    alphas = torch.tensor(alphas_list, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights_list, dtype=x.dtype, device=x.device)
    view = (-1,) + (1,) * (x.ndim - 1)

    def end_score(at_end: bool) -> Tensor | None:
        return torch.empty(x.shape[0], dtype=torch.float64, device=x.device) if end_scores and at_end else None

    # F(x0) and F(x) from the path points at alpha = 0 and 1 (x0 + 1 * (x - x0) is x up to rounding)
    f0, fx = end_score(alphas_list[0] == 0.0), end_score(alphas_list[-1] == 1.0)
    for chunk in run.row_chunks(steps, desc=desc):
        # one broadcast product per sample: no gathered copies of x0 and x - x0
        points = torch.cat([torch.addcmul(x0[r:r + 1], alphas[lo:hi].view(view), diff[r:r + 1])
                            for r, lo, hi in chunk.runs])
        grads = run.gradients(points, chunk.owner)
        del points
        chunk.add_per_sample(total, grads.inputs, weights)
        for scores, step in ((f0, 0), (fx, steps - 1)):
            if scores is not None:
                at = chunk.step == step
                scores[chunk.sample[at]] = grads.scores[at].to(scores.dtype)
        del grads
    return f0, fx


#: First and largest step counts of ``steps="auto"`` (doubling in between; 3, 7, 15, ... with the nested rule).
AUTO_FIRST_STEPS = 4
AUTO_NESTED_FIRST_STEPS = 3
AUTO_MAX_STEPS = 256
#: Default completeness tolerance of ``steps="auto"`` (relative error).
AUTO_TOLERANCE = 0.01


def check_tolerance(tolerance) -> float:
    """``tolerance`` as a float in (0, 1), or a clear error."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) (a relative completeness error), got {tolerance!r}")
    return float(tolerance)


def next_auto_steps(steps: int, rule: str) -> int:
    """The step count ``steps="auto"`` tries after ``steps``: double, or 2 * steps + 1 with the nested rule
    (3, 7, 15, ...: the counts whose points include the earlier ones)."""
    return 2 * steps + 1 if rule == "nested" else 2 * steps


class AutoIG(NamedTuple):
    """What :func:`auto_integrated_gradients` found, per row of the run."""

    map: Tensor
    f0: Tensor  # F(baseline), float64
    fx: Tensor  # F(x), float64
    steps_used: list[int]
    errors: list[float]  # completeness errors
    passes: list[int]  # gradient evaluations spent on the row, every step count tried included


def auto_integrated_gradients(run: "Run", baseline: BaselineSpec | Tensor = "zeros", rule: str = "gausslegendre",
                              tolerance: float = AUTO_TOLERANCE, max_steps: int = AUTO_MAX_STEPS,
                              desc: str = "integrated_gradients") -> AutoIG:
    """Integrated gradients with the fewest steps (doubling, up to ``max_steps``) whose completeness
    error is at most ``tolerance``, chosen per sample.

    Each round runs IG at the next step count on the rows not yet within the tolerance
    only. With the ``"nested"`` rule the step counts are 3, 7, 15, ... (2^k - 1) and each
    round evaluates only the new points (half of them): every gradient computed so far is
    reused, so reaching n steps costs n gradient passes. With the other rules the counts are
    4, 8, 16, ... and no gradient can be reused between rounds (the points for 2n steps are
    not those for n), so reaching n steps costs about 2n. F(x) and F(baseline) are computed once.
    """
    x = run.x
    n_rows = x.shape[0]
    x0 = resolve_baseline(baseline, x, run.sample_index, run.n_samples)
    f0, fx = run.scores_with_x(x0, run.sample_index)
    f0, fx = f0.to(torch.float64), fx.to(torch.float64)
    attr = torch.zeros_like(x)
    steps_used = [0] * n_rows
    errors = [math.inf] * n_rows
    passes = [0] * n_rows
    todo = torch.arange(n_rows, device=x.device)
    nested = rule == "nested"
    steps = min(AUTO_NESTED_FIRST_STEPS if nested else AUTO_FIRST_STEPS, max_steps)
    diff = x - x0
    # nested rule: sum over the points so far of alpha'(t) dF/dx, per row (the map is diff * sums / n)
    sums = torch.zeros_like(x) if nested else None
    first_round = True
    while True:
        part = run if len(todo) == n_rows else run.at(x[todo], run.sample_index[todo])
        label = f"{desc} ({steps} steps)"
        if nested:
            n = steps + 1
            # the points of this round: all of them first, then the odd multiples of 1 / n only
            k = torch.arange(1, n, 1 if first_round else 2, dtype=torch.float64)
            first_round = False
            t = k / n
            part_sums = sums[todo]
            _weighted_gradients(part, x0[todo], diff[todo], _nested_alpha(t).tolist(), _nested_slope(t).tolist(),
                                part_sums, label)
            sums[todo] = part_sums
            found = diff[todo] * part_sums / n
            spent = len(k)
        else:
            found, _, _ = _path_integral(part, x0[todo], steps, rule, label)
            spent = steps
        attr[todo] = found
        info = completeness(found, fx[todo], f0[todo])
        done = []
        for row, error in zip(todo.tolist(), info["error"]):
            steps_used[row], errors[row] = steps, error
            passes[row] += spent
            done.append(error <= tolerance)
        following = next_auto_steps(steps, rule)
        if all(done) or following > max_steps:
            return AutoIG(attr, f0, fx, steps_used, errors, passes)
        todo = todo[~torch.tensor(done, device=x.device)]
        steps = following


@register
class IntegratedGradients(Method):
    """Integrated gradients along the straight path from a baseline to the input.

    Args:
        steps: number of path points (>= 1; >= 2 for ``riemann_trapezoid``), or ``"auto"``: the
            fewest of 4, 8, 16, ... (doubling, at most ``max_steps``; 3, 7, 15, ... with the
            ``"nested"`` rule) whose completeness error is at most ``tolerance``, per sample
            (reported in ``extras["steps_used"]``, the gradient passes spent in ``extras["passes"]``).
        rule: ``"gausslegendre"`` (default, as Captum), ``"riemann_trapezoid"``,
            ``"riemann_left"``, ``"riemann_right"`` or ``"riemann_middle"``; positions and
            weights as in Captum. Or ``"nested"`` (see :func:`quadrature`): with ``steps="auto"``
            each doubling reuses every gradient computed before, so it needs about half the
            gradient passes of Gauss-Legendre's doublings. Gauss-Legendre and nested never evaluate
            the gradient at the baseline itself, where networks with InstanceNorm/GroupNorm can
            have an extreme gradient (the trapezoid and left rules do).
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
            found = auto_integrated_gradients(run, self.baseline, self.rule, self.tolerance, self.max_steps,
                                              desc=self.name)
            used = found.steps_used
            result = Attribution(found.map, {"steps_used": used, "passes": found.passes,
                                             "tolerance": self.tolerance})
            if not run.derived:
                report_completeness(result, run, found.map, found.f0, method=self.name, steps=max(used),
                                    rule=self.rule, tolerance=self.tolerance,
                                    capped=next_auto_steps(max(used), self.rule) > self.max_steps,
                                    score_x=found.fx)
            return result
        # rows derived from the input (SmoothGrad's noisy copies) get no completeness check
        attr, f0, fx = _integrated_gradients(run, self.baseline, self.steps, self.rule, self.name,
                                             end_scores=not run.derived)
        result = Attribution(attr)
        if f0 is not None:
            report_completeness(result, run, attr, f0, method=self.name, steps=self.steps, rule=self.rule,
                                score_x=fx)
        return result
