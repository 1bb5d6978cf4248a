"""Occlusion: how much the score drops when a sliding window is replaced by a baseline.

Semantics of Captum's ``Occlusion``: a box window slides over the spatial axes
from the origin with the given stride; windows start at ``k * stride`` for
``k = 0 .. ceil((size - window) / stride)``, so the last one may stick out of
the input and is cut at the border. Each voxel's attribution is the mean,
over the windows covering it, of ``F(x) - F(x with the window replaced by the baseline)``.

Windows span all channels at once (a voxel is occluded in every channel
together); this is Captum's ``Occlusion`` with ``sliding_window_shapes=(C, *window)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Attribution, Method
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["Occlusion", "window_starts"]


def _per_dim(value, n_dims: int, what: str) -> tuple[int, ...]:
    """An int or one int per spatial dim, checked positive."""
    values = [value] * n_dims if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(values) != n_dims or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                        for v in values):
        raise ValueError(f"occlusion {what} must be a positive int or {n_dims} positive ints "
                         f"(one per spatial dim), got {value!r}")
    return tuple(values)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (Captum's shift counts)."""
    return [k * stride for k in range(math.ceil((size - window) / stride) + 1)]


@register
class Occlusion(Method):
    """Score change when a sliding box (over the spatial axes, all channels) is set to a baseline.

    Args:
        window: window size in voxels, an int or one per spatial dim.
        stride: step between windows, an int or one per spatial dim (at most the window
            along axes the window does not span fully). Default: the window (no overlap).
        baseline: value the window is replaced with: a float, or a tensor broadcastable
            to the input (B, C, *spatial).
    """

    name = "occlusion"

    def __init__(self, window: int | Sequence[int] = 8, stride: int | Sequence[int] | None = None,
                 baseline: float | Tensor = 0.0) -> None:
        self.window = window
        self.stride = stride
        self.baseline = baseline

    def _geometry(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        window = _per_dim(self.window, len(spatial), "window")
        stride = window if self.stride is None else _per_dim(self.stride, len(spatial), "stride")
        if any(w > s for w, s in zip(window, spatial)):
            raise ValueError(f"occlusion window {window} is larger than the input's spatial shape {spatial}")
        for w, s, n in zip(window, stride, spatial):
            if s > w and w < n:
                raise ValueError(f"occlusion stride {stride} must not exceed the window {window} "
                                 "(voxels between windows would never be occluded)")
        return window, stride

    def _baseline(self, x: Tensor) -> Tensor:
        b = torch.as_tensor(self.baseline, dtype=x.dtype).to(x.device)
        try:
            # (torch.broadcast_shapes would import sympy: seconds on first use)
            return b.expand(x.shape) if b.ndim <= x.ndim else b.view(x.shape)
        except RuntimeError:
            raise ValueError(f"occlusion baseline of shape {tuple(b.shape)} does not broadcast to the "
                             f"input's shape {tuple(x.shape)}") from None

    def attribute(self, run: "Run") -> Attribution:
        x = run.x
        spatial = tuple(x.shape[2:])
        window, stride = self._geometry(spatial)
        baseline = self._baseline(x)
        boxes = [tuple(slice(s, s + w) for s, w in zip(starts, window))
                 for starts in itertools.product(*(window_starts(n, w, st)
                                                   for n, w, st in zip(spatial, window, stride)))]
        coverage = torch.zeros(spatial, device=x.device, dtype=x.dtype)
        for box in boxes:
            coverage[box] += 1
        full = run.scores_at_x()
        total = torch.zeros((x.shape[0], 1, *spatial), device=x.device, dtype=x.dtype)
        # Rows are (sample, window) pairs, sample-major.
        for chunk in run.row_chunks(len(boxes), backward=False, desc="occlusion"):
            samples, windows = chunk.sample.tolist(), chunk.step.tolist()
            rows = x[chunk.sample]
            for r, (i, j) in enumerate(zip(samples, windows)):
                rows[(r, slice(None), *boxes[j])] = baseline[(i, slice(None), *boxes[j])]
            drop = full[chunk.sample] - run.scores(rows, chunk.owner)
            del rows
            for r, (i, j) in enumerate(zip(samples, windows)):
                total[(i, 0, *boxes[j])] += drop[r]
        return Attribution((total / coverage).expand_as(x).clone())
