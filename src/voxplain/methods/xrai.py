"""XRAI (Kapishnikov et al. 2019): rank over-segmented regions by attribution density.

Semantics of PAIR ``saliency``'s ``XRAI`` (which handles 2D images only):

1. a base attribution (default: integrated gradients averaged over a black and a
   white baseline, i.e. the sample's min and max) is reduced over channels by max;
2. candidate regions come from several over-segmentations (see :mod:`.segments`);
3. ``'full'``: repeatedly add the candidate whose not-yet-covered part has the
   highest mean attribution (its *gain*), dropping candidates that would add fewer
   than ``min_pixel_diff`` voxels, until the covered area exceeds
   ``area_threshold``; ``'fast'``: rank the candidates once by their own density
   and add them in that order;
4. every voxel gets the gain of the region it was added with; voxels never added
   share the mean attribution of the rest.

The greedy loop is vectorised: candidates are rows of a sparse matrix, and each
added region subtracts its newly covered voxels from every candidate's voxel
count and attribution sum (work proportional to the matrix's non-zeros).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .base import Attribution, Method
from .completeness import report_completeness
from .integrated_gradients import (AUTO_TOLERANCE, auto_integrated_gradients, check_steps, check_tolerance,
                                   integrated_gradients)
from .registry import create_method, register
from .segments import (FELZENSZWALB_SCALES, FELZENSZWALB_SIZE, SLIC_COMPACTNESS, SLIC_N_SEGMENTS, SLIC_SIZE,
                       RegionSet, felzenszwalb_regions, regions_from_segments, slic_regions)

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["XRAI", "xrai_greedy", "XraiResult", "top_fraction"]


class XraiResult:
    """The greedy result over working voxels.

    Attributes:
        gain: (working voxels,) gain of the region each voxel was added with (float64).
        regions: working-voxel indices of each ranked region, most important first.
        gains: gain of each ranked region.
    """

    def __init__(self, gain: np.ndarray, regions: list[np.ndarray], gains: list[float]) -> None:
        self.gain, self.regions, self.gains = gain, regions, gains


def xrai_greedy(masks: sp.csr_matrix, attr_sum: np.ndarray, weight: np.ndarray, algorithm: str = "full",
                area_threshold: float = 1.0, min_pixel_diff: float = 50) -> XraiResult:
    """Rank candidate regions as PAIR's ``XRAI._xrai`` / ``_xrai_fast``.

    Args:
        masks: (candidates, voxels) sparse matrix of ones.
        attr_sum: (voxels,) attribution summed over each (working) voxel.
        weight: (voxels,) number of input voxels behind each working voxel.
        algorithm: ``'full'`` or ``'fast'`` (which ignores ``area_threshold``).
        area_threshold: stop adding regions once this fraction of the input is covered.
        min_pixel_diff: candidates adding fewer input voxels than this are dropped.
    """
    masks = sp.csr_matrix(masks, dtype=np.float64)
    attr_sum = np.asarray(attr_sum, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    total_weight = weight.sum()
    covered = np.zeros(masks.shape[1], dtype=bool)
    trace: list[tuple[np.ndarray, float]] = []
    counts, sums = masks @ weight, masks @ attr_sum

    def new_voxels(k: int) -> np.ndarray:
        row = masks.indices[masks.indptr[k]:masks.indptr[k + 1]]
        return row[~covered[row]]

    if algorithm == "full":
        by_voxel = masks.tocsc()
        alive = np.ones(masks.shape[0], dtype=bool)
        area = 0.0
        while area <= area_threshold:
            alive &= counts >= min_pixel_diff
            if not alive.any():
                break
            gains = np.full(len(counts), -np.inf)
            gains[alive] = sums[alive] / counts[alive]
            best = int(np.argmax(gains))  # first of equal gains, as the reference
            added = new_voxels(best)
            trace.append((added, float(gains[best])))
            covered[added] = True
            area = weight[covered].sum() / total_weight
            alive[best] = False
            # every candidate loses the voxels just covered
            hit = by_voxel[:, added]
            counts -= hit @ weight[added]
            sums -= hit @ attr_sum[added]
    elif algorithm == "fast":
        density = np.full(len(counts), -np.inf)
        nonempty = counts > 0
        density[nonempty] = sums[nonempty] / counts[nonempty]
        for k in np.argsort(-density, kind="stable"):
            added = new_voxels(int(k))
            size = weight[added].sum()
            if size < min_pixel_diff:
                continue
            trace.append((added, float(attr_sum[added].sum() / size)))
            covered[added] = True
    else:
        raise ValueError(f"xrai algorithm must be 'full' or 'fast', got {algorithm!r}")

    gain = np.full(masks.shape[1], -np.inf)
    for voxels, g in trace:
        gain[voxels] = g
    order = sorted(range(len(trace)), key=lambda i: -trace[i][1])  # stable, as the reference
    regions = [trace[i][0] for i in order]
    gains = [trace[i][1] for i in order]
    rest = np.flatnonzero(~covered & (weight > 0))
    if len(rest):
        g = float(attr_sum[rest].sum() / weight[rest].sum())
        gain[rest] = g
        regions.append(rest)
        gains.append(g)
    gain[~covered & (weight == 0)] = 0.0  # working voxels no input voxel maps to
    return XraiResult(gain, regions, gains)


def top_fraction(xrai_map: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the ``fraction`` of voxels (per sample) with the highest XRAI value.

    CXAI shows the top 8% (``fraction=0.08``) of an XRAI map.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    flat = xrai_map.flatten(1).float()
    threshold = torch.quantile(flat, 1 - fraction, dim=1, keepdim=True)
    return (flat >= threshold).view_as(xrai_map)


def _int_list(value, what: str) -> tuple:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
        raise ValueError(f"xrai {what} must be a positive number or a list of them, got {value!r}")
    return values


@register
class XRAI(Method):
    """Region-based attribution (XRAI) in 2D and 3D, PAIR saliency semantics.

    Args:
        base: the base attribution: ``None`` (default) for integrated gradients
            averaged over the sample's min and max baselines, or a registered
            method name (its map is reduced over channels by max).
        base_options: options of ``base`` when given by name.
        steps: integration steps of the default IG base (Gauss-Legendre), or ``"auto"`` (default): for
            each baseline, the fewest of 3, 7, 15, ... steps of the ``"nested"`` rule whose completeness
            error is at most ``tolerance``, every doubling reusing the gradients computed before (see
            :func:`~voxplain.methods.integrated_gradients.auto_integrated_gradients`); ``steps=100`` is
            PAIR's step count.
        tolerance: with ``steps="auto"``, the relative completeness error each base IG reaches.
        base_attribution: a precomputed base map instead: shape (B, C, *spatial),
            (B, 1, *spatial), (C, *spatial) or (*spatial).
        segments: precomputed candidate regions instead of the automatic ones: an
            integer label map or a list of boolean masks / label maps, each of the
            input's spatial shape (used undilated).
        algorithm: ``'full'`` or ``'fast'``.
        area_threshold: fraction of the input the ``'full'`` greedy loop covers
            before it stops (1.0: rank every region); the rest shares one value.
        min_pixel_diff: candidates adding fewer voxels than this are dropped.
        dilation_radius: dilation of automatic segments (default 5 pixels in 2D,
            2 working voxels in 3D).
        segment_size: size the input is resized to for automatic segmentation
            (2D: a square of this side, default 224; 3D: longest axis, default 64).
        scales: Felzenszwalb scales for 2D images.
        n_segments: SLIC supervoxel counts for 3D volumes.
        compactness: SLIC compactness (on the volume rescaled to [-1, 1]).

    ``explain_detailed`` exposes the ranked regions under ``extras["xrai"]``:
    ``ranks`` ((B, *spatial) int, 1 = most important region), ``gains`` (per
    sample, the gain of each rank) and ``base`` (the channel-reduced base map); with
    the default base, ``completeness`` of the averaged base IG (its sum against the
    mean of F(x) - F(min) and F(x) - F(max)).
    """

    name = "xrai"
    single_channel = True

    def __init__(self, base: str | Method | None = None, base_options: dict[str, Any] | None = None,
                 steps: int | str = "auto", base_attribution=None, segments=None, algorithm: str = "full",
                 area_threshold: float = 1.0, min_pixel_diff: int = 50, dilation_radius: int | None = None,
                 segment_size: int | None = None, scales: Sequence[float] = FELZENSZWALB_SCALES,
                 n_segments: Sequence[int] = SLIC_N_SEGMENTS, compactness: float = SLIC_COMPACTNESS,
                 tolerance: float = AUTO_TOLERANCE) -> None:
        if isinstance(base, str):
            self.base = create_method(base, base_options)
        elif base is None or isinstance(base, Method):
            if base_options:
                raise ValueError("xrai base_options need a base method given by name")
            self.base = base
        else:
            raise TypeError(f"xrai base must be a method name or None, got {type(base).__name__}")
        self.base_options = base_options
        if steps != "auto":
            if isinstance(steps, str):
                raise ValueError(f"xrai steps must be an int >= 1 or 'auto', got {steps!r}")
            steps = check_steps(steps)
        self.steps = steps
        self.tolerance = check_tolerance(tolerance)
        self.base_attribution = base_attribution
        self.segments = segments
        if algorithm not in ("full", "fast"):
            raise ValueError(f"xrai algorithm must be 'full' or 'fast', got {algorithm!r}")
        self.algorithm = algorithm
        if isinstance(area_threshold, bool) or not isinstance(area_threshold, (int, float)) \
                or not 0 < area_threshold <= 1:
            raise ValueError(f"xrai area_threshold must be a fraction in (0, 1], got {area_threshold!r}")
        self.area_threshold = float(area_threshold)
        if isinstance(min_pixel_diff, bool) or not isinstance(min_pixel_diff, int) or min_pixel_diff < 1:
            raise ValueError(f"xrai min_pixel_diff must be an int >= 1, got {min_pixel_diff!r}")
        self.min_pixel_diff = min_pixel_diff
        if dilation_radius is not None and (isinstance(dilation_radius, bool)
                                            or not isinstance(dilation_radius, int) or dilation_radius < 0):
            raise ValueError(f"xrai dilation_radius must be an int >= 0, got {dilation_radius!r}")
        self.dilation_radius = dilation_radius
        if segment_size is not None and (isinstance(segment_size, bool) or not isinstance(segment_size, int)
                                         or segment_size < 2):
            raise ValueError(f"xrai segment_size must be an int >= 2 or None, got {segment_size!r}")
        self.segment_size = segment_size
        self.scales = _int_list(scales, "scales")
        self.n_segments = tuple(int(v) for v in _int_list(n_segments, "n_segments"))
        if isinstance(compactness, bool) or not isinstance(compactness, (int, float)) or not compactness > 0:
            raise ValueError(f"xrai compactness must be a positive number, got {compactness!r}")
        self.compactness = float(compactness)

    def layers(self, run: "Run") -> list:
        return self.base.layers(run) if self.base is not None and self.base_attribution is None else []

    def shares_input_gradient(self) -> bool:
        return self.base is not None and self.base_attribution is None and self.base.shares_input_gradient()

    def guided_input_gradient(self) -> str | None:
        if self.base is None or self.base_attribution is not None:
            return None
        return self.base.guided_input_gradient()

    def options(self) -> dict[str, Any]:
        out = super().options()
        if self.segments is not None:
            seg = self.segments
            out["segments"] = (f"{len(seg)} masks/label maps" if isinstance(seg, (list, tuple))
                               else f"label map {tuple(np.shape(seg))}")
        if self.base_attribution is not None:
            out["base_attribution"] = f"map {tuple(np.shape(self.base_attribution))}"
        return out

    # -- base attribution ----------------------------------------------------
    def _base_map(self, run: "Run", extras: dict[str, Any]) -> Tensor:
        """(N, *spatial) base attribution, reduced over channels by max; its checks go into ``extras``."""
        x = run.x
        if self.base_attribution is not None:
            attr = _as_base_attribution(self.base_attribution, x)
        elif self.base is not None:
            base = self.base.attribute(run)
            attr = base.map
            extras.update({k: v for k, v in base.extras.items() if k in ("completeness", "warnings")})
        else:  # PAIR's default: IG from a black and a white image, averaged
            check = not run.derived
            score_x = None
            if self.steps == "auto":  # the nested rule: each doubling of the steps reuses every gradient so far
                found = {b: auto_integrated_gradients(run, b, "nested", tolerance=self.tolerance,
                                                      desc=f"xrai: IG from {b}") for b in ("min", "max")}
                low, f_low, high, f_high = found["min"].map, found["min"].f0, found["max"].map, found["max"].f0
                extras["steps_used"] = {b: f.steps_used for b, f in found.items()}
                extras["passes"] = {b: f.passes for b, f in found.items()}
                steps, rule, score_x = max(found["min"].steps_used + found["max"].steps_used), "nested", found["min"].fx
            else:
                low, f_low = integrated_gradients(run, "min", self.steps, desc="xrai: IG from min",
                                                  baseline_scores=check)
                high, f_high = integrated_gradients(run, "max", self.steps, desc="xrai: IG from max",
                                                    baseline_scores=check)
                steps, rule = self.steps, "gausslegendre"
            attr = (low + high) / 2
            if check:  # sums are linear: the average map against the average score difference
                checked = Attribution(attr)
                report_completeness(checked, run, attr, (f_low + f_high) / 2, method="xrai (base IG)",
                                    steps=steps, rule=rule, score_x=score_x)
                extras.update(checked.extras)
        return attr.amax(dim=1)

    # -- regions ---------------------------------------------------------------
    def _regions(self, image: np.ndarray) -> RegionSet:
        spatial = image.shape[1:]
        if self.segments is not None:
            return regions_from_segments(self.segments, spatial)
        if len(spatial) == 2:
            return felzenszwalb_regions(image, scales=self.scales,
                                        dilation_radius=5 if self.dilation_radius is None else self.dilation_radius,
                                        segment_size=self.segment_size or FELZENSZWALB_SIZE)
        if len(spatial) == 3:
            return slic_regions(image, n_segments=self.n_segments, compactness=self.compactness,
                                dilation_radius=2 if self.dilation_radius is None else self.dilation_radius,
                                segment_size=self.segment_size or SLIC_SIZE)
        raise ValueError("xrai has no automatic segmentation for 1D inputs; pass `segments` "
                         "(an integer label map or a list of boolean masks)")

    def attribute(self, run: "Run") -> Attribution:
        x = run.x
        spatial = tuple(x.shape[2:])
        images = x.detach().cpu().numpy()
        # precomputed segments are shared by all samples; checked before any model work
        shared = self._regions(images[0]) if self.segments is not None else None
        extras: dict[str, Any] = {}
        base = self._base_map(run, extras).detach().to("cpu", torch.float64).numpy()
        maps, ranks, gains = [], [], []
        for i in range(x.shape[0]):
            regions = shared if shared is not None else self._regions(images[i])
            result = xrai_greedy(regions.masks, regions.pool(base[i]), regions.weights(), self.algorithm,
                                 self.area_threshold, self.min_pixel_diff)
            maps.append(regions.expand(result.gain).reshape(spatial))
            rank_work = np.zeros(regions.masks.shape[1], dtype=np.int64)
            for r, voxels in enumerate(result.regions):
                rank_work[voxels] = r + 1
            ranks.append(regions.expand(rank_work).reshape(spatial))
            gains.append(torch.tensor(result.gains, dtype=torch.float64))
        extras.update({"ranks": torch.from_numpy(np.stack(ranks)), "gains": gains,
                       "base": torch.from_numpy(base).to(torch.float32)})
        out = torch.from_numpy(np.stack(maps)).to(device=x.device, dtype=x.dtype).unsqueeze(1)
        return Attribution(out, extras)


def _as_base_attribution(value, x: Tensor) -> Tensor:
    """A precomputed base map as (N, C or 1, *spatial) on ``x``'s device."""
    attr = torch.as_tensor(value.detach() if isinstance(value, Tensor) else np.asarray(value))
    attr = attr.to(device=x.device, dtype=x.dtype)
    n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    if tuple(attr.shape) == spatial:
        attr = attr[None, None]
    elif attr.ndim == x.ndim - 1 and tuple(attr.shape[1:]) == spatial and attr.shape[0] in (1, c):
        attr = attr[None]
    if attr.ndim != x.ndim or tuple(attr.shape[2:]) != spatial or attr.shape[0] not in (1, n) \
            or attr.shape[1] not in (1, c):
        raise ValueError(f"xrai base_attribution must have the input's shape {tuple(x.shape)} (or "
                         f"(B, 1, *spatial), (C, *spatial), (*spatial)), got {tuple(attr.shape)}")
    return attr.expand(n, *attr.shape[1:])
