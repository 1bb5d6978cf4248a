"""Completeness of path attributions: sum(map) = F(x) - F(baseline), and what to say when it fails.

Integrated gradients and its relatives (Guided IG, Blur IG, XRAI's base IG) satisfy
completeness exactly in the limit of many steps; the relative error
``|sum(map) - (F(x) - F(x0))| / |F(x) - F(x0)|`` shows how far a map is from it. Above
:data:`TOLERANCE` a warning names the likely cause.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .base import Attribution

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["TOLERANCE", "SCALE_CANCELLING_NORMS", "completeness", "report_completeness"]

#: Relative completeness error above which a warning is issued.
TOLERANCE = 0.05
#: Normalisation layers that divide out each sample's (or group's) own scale: the model
#: barely sees the path x0 + a (x - x0) from x0 = 0 change with a, except next to a = 0,
#: where there is no scale to normalise by and the gradient is huge (MONAI's BasicUNet,
#: DynUNet, UNet with its default InstanceNorm; transformers' LayerNorm).
SCALE_CANCELLING_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
)
# rules whose points include the baseline itself (alpha = 0)
_ENDPOINT_RULES = ("riemann_trapezoid", "riemann_left")


def completeness(attribution: Tensor, score_x: Tensor, score_baseline: Tensor) -> dict[str, list[float]]:
    """Per sample: ``error`` (relative, as above), ``attribution_sum`` and ``score_difference``.

    An exactly zero score difference gives error 0 if the map sums to 0, else infinity.
    """
    total = attribution.detach().flatten(1).sum(dim=1).to("cpu", torch.float64)
    diff = (score_x.detach() - score_baseline.detach()).to("cpu", torch.float64)
    error = [abs(t - d) / abs(d) if d != 0 else (0.0 if t == 0 else math.inf)
             for t, d in zip(total.tolist(), diff.tolist())]
    return {"error": error, "attribution_sum": total.tolist(), "score_difference": diff.tolist()}


def _samples(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return shown + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def _causes(model: nn.Module, steps: int, rule: str | None, capped: bool = False) -> str:
    causes = []
    norms = Counter(type(m).__name__ for m in model.modules() if isinstance(m, SCALE_CANCELLING_NORMS))
    if norms:
        listed = ", ".join(f"{n} x{c}" for n, c in sorted(norms.items()))
        causes.append(f"the model's {listed} layers cancel the input's scale, so along a straight path from a "
                      "constant baseline such as zeros the score changes almost only right next to the baseline, "
                      "where the steps miss it or the gradient is extreme (try baseline 'min' or 'blur')")
    if rule in _ENDPOINT_RULES:
        causes.append(f"rule {rule!r} takes the gradient at the baseline itself, where it can be extreme "
                      "(use 'gausslegendre')")
    if capped:
        causes.append(f"too few steps: steps='auto' stopped at its cap of {steps} (raise max_steps)")
    else:
        causes.append(f"too few steps ({steps}; try {4 * steps})")
    return "; or ".join(causes)


def report_completeness(result: Attribution, run: "Run", attribution: Tensor, score_baseline: Tensor, *,
                        method: str, steps: int, rule: str | None = None,
                        tolerance: float = TOLERANCE, capped: bool = False,
                        score_x: Tensor | None = None) -> dict[str, Any]:
    """Put the completeness of ``attribution`` in ``result.extras["completeness"]``; warn above ``tolerance``.

    ``score_baseline`` is F at the path's start, per row of ``run.x``; F(x) comes from the run.
    ``capped``: ``steps`` was the cap of an automatic step count (the warning says so).
    ``score_x``: F(x) per row where the method has it already (e.g. from its path's end point).
    """
    if score_x is None:
        score_x = run.scores_at_x()
    info = completeness(attribution, score_x, score_baseline)
    result.extras["completeness"] = info
    fx = score_x.detach().double().cpu().abs()
    f0 = score_baseline.detach().double().cpu().abs()
    bad = [i for i, e in enumerate(info["error"]) if e > tolerance]
    # a difference this small next to the scores themselves is rounding noise: a relative error means nothing
    near_zero = [i for i in bad if abs(info["score_difference"][i]) <= max(1e-3 * float(max(fx[i], f0[i])), 1e-6)]
    real = [i for i in bad if i not in near_zero]
    if near_zero:
        i = near_zero[0]
        result.warn(f"{method}: F(x) - F(baseline) = {info['score_difference'][i]:.3g} is near zero for sample(s) "
                    f"{_samples(near_zero)} (the scores are about {float(max(fx[i], f0[i])):.3g}), so the relative "
                    f"completeness error is not meaningful there; the map sums to {info['attribution_sum'][i]:.3g}",
                    RuntimeWarning)
    if real:
        i = max(real, key=lambda k: info["error"][k])
        result.warn(f"{method}: completeness error {info['error'][i]:.1%} > {100 * tolerance:g}% for sample(s) "
                    f"{_samples(real)} (worst: the map sums to {info['attribution_sum'][i]:.4g}, F(x) - F(baseline) "
                    f"= {info['score_difference'][i]:.4g}); likely cause: {_causes(run.model, steps, rule, capped)}",
                    RuntimeWarning)
    return info
