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
        # The windows form a grid: window j is the product of one interval per axis, and
        # ``covers[d][k, p]`` says whether the k-th interval of axis d covers position p.
        covers = [_intervals(n, w, st, x.device) for n, w, st in zip(spatial, window, stride)]
        grid = tuple(c.shape[0] for c in covers)
        # windows covering each voxel: a product of per-axis counts
        coverage = _outer([c.sum(dim=0).to(x.dtype) for c in covers])
        full = run.scores_at_x()
        total = torch.zeros((x.shape[0], 1, *spatial), device=x.device, dtype=x.dtype)
        # Rows are (sample, window) pairs, sample-major; each chunk is built and summed at once.
        for chunk in run.row_chunks(math.prod(grid), backward=False, desc="occlusion"):
            per_axis = [c[k] for c, k in zip(covers, torch.unravel_index(chunk.step, grid))]  # (n, size_d) each
            inside = _outer(per_axis, batched=True).unsqueeze(1)  # (n, 1, *spatial)
            rows = torch.where(inside, baseline[chunk.sample], x[chunk.sample])
            del inside
            drop = full[chunk.sample] - run.scores(rows, chunk.owner)
            del rows
            offset = 0
            for r, lo, hi in chunk.runs:  # each sample's rows: sum_j drop_j * window_j
                part = slice(offset, offset + hi - lo)
                total[r, 0] += _outer([drop[part, None] * per_axis[0][part].to(x.dtype)]
                                      + [p[part].to(x.dtype) for p in per_axis[1:]], batched=True).sum(dim=0)
                offset += hi - lo
        return Attribution((total / coverage).expand_as(x).clone())


def _intervals(size: int, window: int, stride: int, device) -> Tensor:
    """(windows, size) boolean: which positions of an axis each window start covers (cut at the border)."""
    starts = torch.tensor(window_starts(size, window, stride), device=device)
    pos = torch.arange(size, device=device)
    return (pos[None] >= starts[:, None]) & (pos[None] < starts[:, None] + window)


def _outer(vectors: list[Tensor], batched: bool = False) -> Tensor:
    """The outer product of one vector per axis, (*sizes); with ``batched``, one per row: (n, *sizes)."""
    lead = 1 if batched else 0
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v.view(*v.shape[:lead], *([1] * (out.ndim - lead)), v.shape[-1])
    return out
