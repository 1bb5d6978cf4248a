"""Blur integrated gradients (Xu et al. 2020): integrate along a Gaussian scale-space path.

The path runs from the input blurred at ``max_sigma`` back to the input itself;
the attribution is ``-sum_i (sigma_{i+1} - sigma_i) * dblur/dsigma(sigma_i) * grad F(blur(x, sigma_i))``,
with ``dblur/dsigma`` taken as a forward difference of step ``grad_step``. The
semantics (sigma grid, finite difference, truncated kernel, zero padding) are
those of PAIR ``saliency``'s ``BlurIG``, which blurs 2D images only; here the
blur is N-dimensional over the spatial axes and never mixes channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Attribution, Method
from .completeness import report_completeness
from .integrated_gradients import check_steps
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["BlurIG", "gaussian_blur", "gaussian_blur_and_slope", "blur_sigmas"]

#: Kernel half-width in standard deviations, as scipy.ndimage.gaussian_filter's default.
TRUNCATE = 4.0


def _blur_matrices(sigmas: Tensor, n: int, device, dtype=torch.float32) -> Tensor:
    """(K, n, n) matrices that blur a length-``n`` signal at each of ``K`` sigmas.

    Row i holds the truncated, normalised Gaussian kernel centred on i; entries
    that would fall outside the signal are dropped, which is zero ('constant')
    padding with the kernel normalised over its full length, as in scipy.
    """
    # Built in float64 on the CPU (small matrices) so every device gets the same taps.
    sig = sigmas.detach().to("cpu", torch.float64)
    radius = torch.floor(TRUNCATE * sig + 0.5)  # scipy: int(truncate * sigma + 0.5)
    offsets = torch.arange(-n + 1, n, dtype=torch.float64)
    safe = torch.where(sig > 0, sig, torch.ones_like(sig))[:, None]
    # The normaliser sums the kernel over its whole support, even beyond the signal.
    r_max = int(radius.max()) if sig.numel() else 0
    full = torch.arange(-r_max, r_max + 1, dtype=torch.float64)[None]
    norm = (torch.exp(-0.5 * (full / safe) ** 2) * (full.abs() <= radius[:, None])).sum(1)
    taps = torch.exp(-0.5 * (offsets[None] / safe) ** 2) * (offsets[None].abs() <= radius[:, None])
    taps = taps / norm[:, None]
    # sigma 0 (or below scipy's 1e-15 cut-off) leaves the axis untouched.
    identity = (offsets == 0).to(torch.float64)
    taps = torch.where((sig > 1e-15)[:, None], taps, identity[None])
    i = torch.arange(n)
    index = (i[None, :] - i[:, None]) + n - 1  # offset j - i of entry (i, j)
    return taps[:, index].to(device=device, dtype=dtype)


def gaussian_blur(x: Tensor, sigmas: Tensor | float) -> Tensor:
    """Blur rows ``x`` (K, C, *spatial) over the spatial axes, row k at ``sigmas[k]``.

    Matches ``scipy.ndimage.gaussian_filter(mode='constant', truncate=4.0)``
    applied to each channel with the same sigma on every spatial axis. The blur
    along each axis is a matrix product with a banded (Toeplitz) matrix.
    """
    if not isinstance(sigmas, Tensor):
        sigmas = torch.full((x.shape[0],), float(sigmas), dtype=torch.float64)
    sigmas = sigmas.reshape(-1)
    if sigmas.numel() != x.shape[0]:
        raise ValueError(f"need one sigma per row: {x.shape[0]} rows, {sigmas.numel()} sigmas")
    out = x
    for axis in range(2, x.ndim):
        # one matrix per row, shared by its channels and lines
        out = _along(out, _blur_matrices(sigmas, x.shape[axis], x.device, x.dtype), axis)
    return out


def _along(x: Tensor, mats: Tensor, axis: int) -> Tensor:
    """Apply one (n, n) matrix per row of ``x`` along spatial ``axis``: a batched matmul."""
    moved = x.movedim(axis, -1)
    shape = moved.shape
    lines = moved.reshape(shape[0], -1, shape[-1])
    return torch.bmm(lines, mats.transpose(1, 2)).reshape(shape).movedim(-1, axis)


def gaussian_blur_and_slope(x: Tensor, sigmas: Tensor, grad_step: float) -> tuple[Tensor, Tensor]:
    """Rows ``x`` blurred at ``sigmas`` (as :func:`gaussian_blur`) and the forward difference
    ``(blur(sigma + grad_step) - blur(sigma)) / grad_step``.

    Subtracting two float32 blurs that differ by a 0.01 step in sigma and dividing by
    the step amplifies the blur's rounding about a hundredfold (0.3-0.5% of the slope at
    sigma 25-50, where scipy's blur, which rounds once from float64, is at 0.04%). Here
    the difference is taken exactly on the small per-axis matrices, in float64, and
    telescoped over the axes: with M, M' the blur matrices at sigma and sigma + step and
    D = (M' - M) / step, ``s_i = M'_i s_(i-1) + D_i p_(i-1)`` and ``p_i = M_i p_(i-1)``, so
    no difference of two large, nearly equal tensors is ever formed.
    """
    sigmas = sigmas.reshape(-1)
    if sigmas.numel() != x.shape[0]:
        raise ValueError(f"need one sigma per row: {x.shape[0]} rows, {sigmas.numel()} sigmas")
    points, slope = x, None
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        at = _blur_matrices(sigmas, n, "cpu", torch.float64)
        after = _blur_matrices(sigmas + grad_step, n, "cpu", torch.float64)
        diff = ((after - at) / grad_step).to(x.device, x.dtype)
        at, after = at.to(x.device, x.dtype), after.to(x.device, x.dtype)
        slope = _along(points, diff, axis) if slope is None else _along(slope, after, axis) + _along(points, diff, axis)
        points = _along(points, at, axis)
    if slope is None:  # no spatial axis: nothing to blur
        slope = torch.zeros_like(x)
    return points, slope


def blur_sigmas(max_sigma: float, steps: int, sqrt: bool = False) -> Tensor:
    """The ``steps + 1`` sigmas of the blur path, from 0 to ``max_sigma`` (float64)."""
    i = torch.arange(steps + 1, dtype=torch.float64)
    sig = i * float(max_sigma) / float(steps)
    return torch.sqrt(sig) if sqrt else sig


def _positive_number(value, what: str, integer: bool = False):
    kind = "int" if integer else "number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what} must be a positive {kind}, got {value!r}")
    return value


@register
class BlurIG(Method):
    """Integrated gradients along a Gaussian blur path (Xu et al. 2020), N-dimensional.

    Args:
        max_sigma: blur (in voxels) at the start of the path.
        steps: number of path segments (gradient evaluations).
        grad_step: sigma step of the finite difference for d(blur)/d(sigma).
        sqrt: space the sigmas as ``sqrt(i * max_sigma / steps)`` instead of linearly.

    Reports its completeness error, against F(x) - F(x blurred at ``max_sigma``), in
    ``extras["completeness"]`` and warns when it is above 5%.
    """

    name = "blur_ig"

    def __init__(self, max_sigma: float = 50.0, steps: int = 100, grad_step: float = 0.01,
                 sqrt: bool = False) -> None:
        self.max_sigma = _positive_number(max_sigma, "blur_ig max_sigma")
        self.steps = check_steps(_positive_number(steps, "blur_ig steps", integer=True), "blur_ig steps")
        self.grad_step = _positive_number(grad_step, "blur_ig grad_step")
        self.sqrt = bool(sqrt)

    def attribute(self, run: "Run") -> Attribution:
        x = run.x
        steps = self.steps
        sigmas = blur_sigmas(self.max_sigma, steps, self.sqrt)
        deltas = (sigmas[1:] - sigmas[:-1]).to(x.device, x.dtype)
        total = torch.zeros_like(x)
        # Rows are (sample, step) pairs; each chunk blurs its own points. The passes run the model
        # exactly as it came: gradients at heavily blurred points are ill-conditioned, and oneDNN's
        # channels-last kernels moved a 2D CNN's Blur IG map 6.4e-2 (relative) from its float64
        # value, against 5e-4 in the model's layout at any batch size.
        with run.exact_model():
            for chunk in run.row_chunks(steps, desc="blur_ig"):
                step = chunk.step.cpu()
                points, slope = gaussian_blur_and_slope(x[chunk.sample], sigmas[step], self.grad_step)
                grads = run.gradients(points, chunk.owner).inputs
                del points
                slope.mul_(grads).mul_(deltas[chunk.step].view(-1, *([1] * (x.ndim - 1))))
                del grads
                chunk.add_per_sample(total, slope)
                del slope
        result = Attribution(-total)
        if not run.derived:
            # the path starts at the input blurred at max_sigma, which no step evaluates: one forward
            start = run.scores(gaussian_blur(x, sigmas[-1].expand(x.shape[0])), run.sample_index)
            report_completeness(result, run, result.map, start, method=self.name, steps=steps)
        return result
