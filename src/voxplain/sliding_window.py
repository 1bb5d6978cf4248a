"""Sliding-window inference and its exact gradients, computed one patch batch at a time.

Patch-trained networks (nnU-Net, MONAI bundles) are applied to a whole scan by
sliding a window of ``roi_size`` over it and blending the overlapping window
outputs. :class:`SlidingWindow` applies a model exactly as MONAI's
``monai.inferers.sliding_window_inference`` does:

* **Padding.** Along an axis shorter than the window the volume is padded to the
  window size, ``diff // 2`` before and the rest after (``padding_mode``/``cval``
  as in ``torch.nn.functional.pad``); the stitched output is cropped back.
* **Windows.** Along axis ``i`` the step is ``int(roi[i] * (1 - overlap[i]))`` (at
  least 1; the whole axis when the window spans it); windows start at
  ``0, step, 2 step, ...`` until one reaches the end, the last one shifted back to
  end at the border. Windows are visited in row-major order (first axis slowest),
  row after row of the batch, ``sw_batch_size`` windows per model call.
* **Blending.** Every window output is multiplied by a weight map ``w`` of the
  window's size, pasted at its place and summed; the sum is divided voxel-wise by
  the sum of the pasted weight maps. ``mode="constant"``: ``w = 1``;
  ``mode="gaussian"``: the product over axes of ``exp(-t^2 / (2 sigma^2))``,
  ``t`` the offset from the window centre in voxels, ``sigma = sigma_scale * roi``,
  with weights below ``max(min(w), 1e-3)`` raised to it.

The stitched output is ``Y = sum_w paste(w * P_w) / S`` with ``P_w`` the model's
output on window ``w`` and ``S = sum_w paste(w)``. For a scalar score ``F(Y)``
the chain rule gives

    dF/dx = sum_w J_w^T [ w * crop_w(dF/dY / S) ]

(``J_w`` the Jacobian of the model on window ``w``; padding folded back by the
adjoint of the padding). :meth:`SlidingWindow.gradients` evaluates it with
memory bounded by one patch batch rather than by the volume: one pass without
gradient stitches ``Y``; autograd of ``F`` with respect to ``Y`` gives ``dF/dY``
(cheap: no model); then per patch batch one forward with gradient and one
backward seeded with the upstream gradient above, accumulated into ``dF/dx``.
When ``F`` is affine in ``Y`` (e.g. logits averaged over a fixed region),
``dF/dY`` does not depend on ``Y`` and ``affine_score=True`` skips the first pass.

**Grad-CAM under sliding windows.** A layer's activation ``A_w`` exists per
window, and ``dF/dA_w`` above is the exact gradient of the *whole-volume* score
with respect to it. The CAM of window ``w`` is the ordinary Grad-CAM of that
window, ``ReLU(sum_k mean_space(dF/dA_w,k) A_w,k)``, upsampled (trilinear,
``align_corners=False``) to the window size; the whole-volume CAM blends the
window CAMs exactly as outputs are blended (same weight map, divided by the same
weight sum, padding cropped). A window that does not influence the score gets a
zero CAM; where windows overlap, the CAM is their weighted average.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import HookSet, LayerCapture

__all__ = ["SlidingWindow", "WindowPlan", "SlidingGradients", "window_weight_map", "gradcam_window_map",
           "as_sliding_window", "SETTINGS"]

_MODES = ("constant", "gaussian")
#: the keyword arguments of :class:`SlidingWindow` (and of a ``sliding_window={...}`` dict)
SETTINGS = ("roi_size", "overlap", "mode", "sigma_scale", "sw_batch_size", "padding_mode", "cval")
_PADDING_MODES = ("constant", "reflect", "replicate", "circular")

ModelCall = Callable[[Tensor], Tensor]
#: (activation, its gradient, window size) -> a map on the window's grid, (b, C', *roi)
LayerMap = Callable[[Tensor, Tensor, tuple[int, ...]], Tensor]


def window_weight_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                      device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The blending weight of a window of ``roi_size`` voxels (MONAI's importance map), shape ``roi_size``.

    ``"constant"``: ones. ``"gaussian"``: the product over axes of
    ``exp(-t^2 / (2 (sigma_scale * n)^2))`` for offsets ``t`` from the window's centre,
    computed in float32; weights below ``max(min, 1e-3)`` are raised to it.
    """
    roi_size = tuple(int(n) for n in roi_size)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "constant":
        weight = torch.ones(roi_size, device=device, dtype=torch.float32)
    else:
        scales = _per_axis(sigma_scale, len(roi_size), "sigma_scale", float)
        weight = None
        for n, scale in zip(roi_size, scales):
            t = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2.0
            profile = torch.exp(t**2 / (-2 * (scale * n) ** 2))
            weight = profile if weight is None else weight.unsqueeze(-1) * profile
    floor = max(weight.min().item(), 1e-3)
    return weight.clamp(min=floor).to(dtype)


def gradcam_window_map(activation: Tensor, gradient: Tensor, roi_size: tuple[int, ...]) -> Tensor:
    """Grad-CAM of each window, (b, 1, *roi): ReLU of the gradient-weighted channel sum, upsampled."""
    from .methods.gradcam import cam_from_gradients, upsample_cam

    return upsample_cam(cam_from_gradients(activation, gradient), roi_size)


def as_sliding_window(spec) -> "SlidingWindow | None":
    """``spec`` as a :class:`SlidingWindow`: None stays None, a SlidingWindow is taken as is, a dict
    gives the keyword arguments (``{"roi_size": (96, 96, 96), "overlap": 0.5, "mode": "gaussian"}``)."""
    if spec is None or isinstance(spec, SlidingWindow):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"sliding_window must be None, a SlidingWindow or a dict of its settings {SETTINGS}, "
                        f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SETTINGS))
    if unknown or "roi_size" not in spec:
        raise ValueError(f"sliding_window needs 'roi_size' and takes only {', '.join(SETTINGS)}; got "
                         f"{', '.join(map(repr, spec)) or 'nothing'}")
    return SlidingWindow(**spec)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows go on a volume of ``spatial_shape`` voxels.

    Attributes:
        spatial_shape: the volume's spatial shape.
        pad: ``(before, after)`` voxels added per spatial axis (volume shorter than the window).
        roi_size: the window size (each axis at most the padded volume's).
        windows: start index of every window on the padded grid, in visiting order.
        weight: the window's blending weight map, shape ``roi_size``.
    """

    spatial_shape: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]
    roi_size: tuple[int, ...]
    windows: tuple[tuple[int, ...], ...]
    weight: Tensor

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Spatial shape after padding."""
        return tuple(n + a + b for n, (a, b) in zip(self.spatial_shape, self.pad))

    def window_slices(self, index: int) -> tuple[slice, ...]:
        """Spatial slices of window ``index`` on the padded grid."""
        return tuple(slice(s, s + r) for s, r in zip(self.windows[index], self.roi_size))

    @cached_property
    def weight_sum(self) -> Tensor:
        """The sum of the pasted weight maps on the padded grid, shape (1, 1, *padded_shape)."""
        total = self.weight.new_zeros((1, 1) + self.padded_shape)
        for i in range(len(self.windows)):
            total[(Ellipsis,) + self.window_slices(i)] += self.weight
        return total

    @property
    def crop(self) -> tuple[slice, ...]:
        """Spatial slices taking the original volume out of the padded grid."""
        return tuple(slice(a, a + n) for n, (a, _) in zip(self.spatial_shape, self.pad))

    @property
    def torch_pad(self) -> list[int]:
        """``pad`` in the argument order of ``torch.nn.functional.pad`` (last axis first)."""
        return [p for before_after in reversed(self.pad) for p in before_after]


@dataclass
class SlidingGradients:
    """Result of :meth:`SlidingWindow.gradients` for N rows.

    Attributes:
        scores: (N,) the scores of the stitched outputs.
        output: (N, K, *spatial) the stitched output (no gradient).
        inputs: (N, C, *spatial) dF/dx, or None when not asked for.
        layer_maps: per captured layer, the blended per-window map (N, C', *spatial)
            (Grad-CAM by default).
    """

    scores: Tensor
    output: Tensor
    inputs: Tensor | None
    layer_maps: list[Tensor] = field(default_factory=list)


class SlidingWindow:
    """Apply a model by sliding windows exactly as MONAI does, and differentiate through it patch by patch.

    Args:
        roi_size: window size per spatial axis (an int for all); an entry of
            ``None`` or <= 0 takes the whole axis, as in MONAI.
        overlap: fraction of a window shared with the next, per axis or one for all, in [0, 1).
        mode: ``"gaussian"`` or ``"constant"`` blending (MONAI's default is
            ``"constant"`` and overlap 0.25; a MONAI bundle's settings must be passed as given).
        sigma_scale: Gaussian sigma as a fraction of the window size, per axis or one for all.
        sw_batch_size: windows per model call; bounds the memory of a pass.
        padding_mode: how a volume shorter than the window is padded:
            ``"constant"`` (with ``cval``), ``"reflect"``, ``"replicate"`` or ``"circular"``.
        cval: the padding value for ``"constant"``.

    ``model_call`` arguments take a (b, C, *roi) batch of windows and must return
    a tensor (b, K, *roi): a segmentation-style output on the window's grid. The
    model is called as it is: put it in eval mode first (the engine does), or the
    stitching pass and the gradient pass see different BatchNorm/dropout behaviour.
    """

    def __init__(self, roi_size: int | Sequence[int | None], overlap: float | Sequence[float] = 0.5,
                 mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125, sw_batch_size: int = 1,
                 padding_mode: str = "constant", cval: float = 0.0) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
        self.roi_size = roi_size
        self.overlap = overlap
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.sw_batch_size = sw_batch_size
        self.padding_mode = padding_mode
        self.cval = float(cval)
        self._plans: dict[tuple, WindowPlan] = {}

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (the keyword arguments that rebuild it)."""
        def plain(v):
            return list(v) if isinstance(v, (tuple, list)) else v
        return {k: plain(getattr(self, k)) for k in SETTINGS}

    def __repr__(self) -> str:
        return (f"SlidingWindow(roi_size={self.roi_size!r}, overlap={self.overlap!r}, mode={self.mode!r}, "
                f"sigma_scale={self.sigma_scale!r}, sw_batch_size={self.sw_batch_size}, "
                f"padding_mode={self.padding_mode!r}, cval={self.cval})")

    # -- geometry ------------------------------------------------------------
    def plan(self, spatial_shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> WindowPlan:
        """The :class:`WindowPlan` for a volume of ``spatial_shape`` (cached per shape, device and dtype)."""
        spatial_shape = tuple(int(n) for n in spatial_shape)
        key = (spatial_shape, str(device), dtype)
        if key not in self._plans:
            self._plans[key] = self._make_plan(spatial_shape, device, dtype)
        return self._plans[key]

    def _make_plan(self, shape: tuple[int, ...], device, dtype) -> WindowPlan:
        ndim = len(shape)
        roi = _roi_for(self.roi_size, shape)
        overlaps = _per_axis(self.overlap, ndim, "overlap", float)
        if any(not 0 <= o < 1 for o in overlaps):
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        pad = tuple(((r - n) // 2, (r - n) - (r - n) // 2) if r > n else (0, 0) for n, r in zip(shape, roi))
        padded = tuple(n + a + b for n, (a, b) in zip(shape, pad))
        starts_per_axis = []
        for n, r, o in zip(padded, roi, overlaps):
            step = r if r == n else max(int(r * (1 - o)), 1)
            count = next(i for i in itertools.count() if i * step + r >= n) + 1
            starts_per_axis.append([min(i * step, n - r) for i in range(count)])
        windows = tuple(itertools.product(*starts_per_axis))
        weight = window_weight_map(roi, self.mode, self.sigma_scale, device=device, dtype=dtype)
        return WindowPlan(shape, pad, roi, windows, weight)

    def _pad(self, x: Tensor, plan: WindowPlan) -> Tensor:
        if not any(a or b for a, b in plan.pad):
            return x
        return F.pad(x, plan.torch_pad, mode=self.padding_mode, value=self.cval if self.padding_mode == "constant"
                     else None)

    def _batches(self, n_rows: int, plan: WindowPlan) -> Iterator[list[tuple[int, int]]]:
        """(row, window) pairs in MONAI's order, ``sw_batch_size`` at a time (a batch may span rows)."""
        pairs = [(row, w) for row in range(n_rows) for w in range(len(plan.windows))]
        for start in range(0, len(pairs), self.sw_batch_size):
            yield pairs[start:start + self.sw_batch_size]

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim < 3:
            raise ValueError(f"expected an input tensor (N, C, *spatial) with 1 to 3 spatial axes, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")

    @staticmethod
    def _check_output(out, windows: Tensor, plan: WindowPlan) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"sliding-window explanation needs a model returning one tensor per window, got "
                            f"{type(out).__name__}")
        if out.ndim != windows.ndim or out.shape[0] != windows.shape[0] or tuple(out.shape[2:]) != plan.roi_size:
            raise ValueError(f"sliding-window explanation needs an output (b, K, *roi) on the window's grid: for "
                             f"windows of shape {tuple(windows.shape)} the model returned {tuple(out.shape)}")
        return out

    # -- evaluation ----------------------------------------------------------
    def forward(self, model_call: ModelCall, x: Tensor) -> Tensor:
        """The stitched whole-volume output (N, K, *spatial) of ``model_call`` on ``x`` (N, C, *spatial), no gradient."""
        self._check_input(x)
        plan = self.plan(x.shape[2:], x.device, x.dtype)
        with torch.no_grad():
            xp = self._pad(x, plan)
            out = None
            for batch in self._batches(x.shape[0], plan):
                windows = self._gather(xp, plan, batch)
                y = self._check_output(model_call(windows), windows, plan)
                out = self._paste_weighted(out, y, plan, batch, x.shape[0])
            out /= plan.weight_sum
            return out[(slice(None), slice(None)) + plan.crop]

    def gradients(self, model_call: ModelCall, x: Tensor, score_fn: Callable[[Tensor], Tensor], *,
                  capture: Sequence[nn.Module] = (), layer_map: LayerMap = gradcam_window_map,
                  input_gradient: bool = True, affine_score: bool = False) -> SlidingGradients:
        """Scores of the stitched output and their gradients, one patch batch at a time.

        Args:
            model_call: the model (or a callable running it) on a batch of windows.
            x: rows (N, C, *spatial), e.g. an input or the points of an integration path.
            score_fn: maps the stitched output (N, K, *spatial) to scores (N,); each
                row's score must depend on that row only.
            capture: modules of the model whose per-window activations and gradients
                ``layer_map`` turns into maps blended over the volume (Grad-CAM by default).
            layer_map: (activation, gradient, roi) -> (b, C', *roi) for each captured layer.
            input_gradient: return dF/dx (False when only layer maps are wanted).
            affine_score: ``score_fn`` is affine in the output, so dF/dY is the same for
                every output: one pass instead of two. Wrong results if it is not.

        Windows whose backward seed ``w * crop_w(dF/dY / S)`` is zero everywhere (the
        score does not read their output, e.g. a region score far from them) add
        nothing to any gradient or layer map and are not run in the gradient pass.
        With ``affine_score`` that makes ``output`` incomplete where the score does not
        read it: it is then None (the scores are exact).

        Memory: the volume-sized buffers (input, its gradient, output, dF/dY) plus
        one model forward/backward on ``sw_batch_size`` windows.
        """
        self._check_input(x)
        n_rows = x.shape[0]
        plan = self.plan(x.shape[2:], x.device, x.dtype)
        if not affine_score:
            y_stitched = self.forward(model_call, x)
            scores, upstream = _score_and_gradient(score_fn, y_stitched)
        else:
            y_stitched = upstream = scores = None
        with torch.no_grad():
            xp = self._pad(x.detach(), plan)
        dxp = torch.zeros_like(xp) if input_gradient else None
        maps: list[Tensor | None] = [None] * len(capture)
        stitched = None
        skipped = False
        hooks = HookSet()
        pairs = [(row, w) for row in range(n_rows) for w in range(len(plan.windows))]
        position = 0
        try:
            while position < len(pairs):
                if upstream is None:  # affine score, first batch: dF/dY is known once the output's channels are
                    batch = pairs[position:position + self.sw_batch_size]
                    position += len(batch)
                else:  # the next windows whose backward seed is not zero everywhere
                    batch = []
                    while position < len(pairs) and len(batch) < self.sw_batch_size:
                        if self._influences(upstream, plan, pairs[position]):
                            batch.append(pairs[position])
                        else:
                            skipped = True
                        position += 1
                    if not batch:
                        break
                windows = self._gather(xp, plan, batch).requires_grad_(True)
                layers = LayerCapture(capture)
                layers.install(hooks)
                try:
                    with torch.enable_grad():
                        y = self._check_output(model_call(windows), windows, plan)
                        acts = layers.activations()
                finally:
                    hooks.remove()
                if upstream is None:  # affine score: dF/dY taken once, at a zero output
                    zero = y.new_zeros((n_rows, y.shape[1]) + plan.spatial_shape)
                    _, upstream = _score_and_gradient(score_fn, zero)
                if affine_score:
                    stitched = self._paste_weighted(stitched, y.detach(), plan, batch, n_rows)
                seed = self._upstream_windows(upstream, plan, batch)
                wrt = ([windows] if input_gradient else []) + acts
                grads = torch.autograd.grad(y, wrt, grad_outputs=seed, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
                del y, seed
                if input_gradient:
                    for j, (row, w) in enumerate(batch):
                        dxp[(row, slice(None)) + plan.window_slices(w)] += grads[0][j]
                for i, (act, grad) in enumerate(zip(acts, grads[len(grads) - len(acts):])):
                    m = layer_map(act.detach(), grad, plan.roi_size)
                    maps[i] = self._paste_weighted(maps[i], m.detach(), plan, batch, n_rows)
                del acts, grads, windows
        finally:
            hooks.remove()
        if affine_score:
            stitched /= plan.weight_sum
            y_stitched = stitched[(slice(None), slice(None)) + plan.crop]
            with torch.no_grad():
                scores = score_fn(y_stitched).detach()
            if skipped:  # complete only where the score reads it
                y_stitched = None
        # a layer no window reached (the score depends on no window) gets a zero map
        layer_maps = [x.new_zeros((n_rows, 1) + plan.spatial_shape) if m is None
                      else (m / plan.weight_sum)[(slice(None), slice(None)) + plan.crop] for m in maps]
        dx = self._unpad_gradient(x, dxp, plan) if input_gradient else None
        return SlidingGradients(scores=scores, output=y_stitched, inputs=dx, layer_maps=layer_maps)

    def window(self, x: Tensor, index: int | None = None) -> Tensor:
        """Window ``index`` of every row of ``x`` (N, C, *roi), padded as the model sees it; by default
        the window whose centre is nearest the volume's centre (e.g. to trace layers or show activations)."""
        self._check_input(x)
        plan = self.plan(x.shape[2:], x.device, x.dtype)
        if index is None:
            index = self.central_window(x.shape[2:])
        with torch.no_grad():
            return self._pad(x, plan)[(slice(None), slice(None)) + plan.window_slices(index)]

    def central_window(self, spatial_shape: Sequence[int]) -> int:
        """Index of the window whose centre is nearest the centre of a volume of ``spatial_shape``."""
        plan = self.plan(spatial_shape)
        middle = [(n - 1) / 2 for n in plan.padded_shape]
        return min(range(len(plan.windows)), key=lambda w: sum(
            (s + (r - 1) / 2 - c) ** 2 for s, r, c in zip(plan.windows[w], plan.roi_size, middle)))

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _influences(upstream: Tensor, plan: WindowPlan, pair: tuple[int, int]) -> bool:
        """Whether dF/dY of row ``pair[0]`` is non-zero anywhere in window ``pair[1]`` (unpadded grid)."""
        row, w = pair
        region = tuple(slice(max(start - off, 0), max(min(start - off + r, n), 0))
                       for start, r, (off, _), n in zip(plan.windows[w], plan.roi_size, plan.pad, plan.spatial_shape))
        return bool(upstream[(row, slice(None)) + region].any())

    @staticmethod
    def _gather(xp: Tensor, plan: WindowPlan, batch: list[tuple[int, int]]) -> Tensor:
        parts = [xp[(slice(row, row + 1), slice(None)) + plan.window_slices(w)] for row, w in batch]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _paste_weighted(acc: Tensor | None, y: Tensor, plan: WindowPlan, batch, n_rows: int) -> Tensor:
        if acc is None:
            acc = y.new_zeros((n_rows, y.shape[1]) + plan.padded_shape)
        y = y * plan.weight
        for j, (row, w) in enumerate(batch):
            acc[(row, slice(None)) + plan.window_slices(w)] += y[j]
        return acc

    def _upstream_windows(self, upstream: Tensor, plan: WindowPlan, batch) -> Tensor:
        """The seed of each window's backward: w * crop_w(dF/dY / S), (b, K, *roi)."""
        parts = []
        offsets = [a for a, _ in plan.pad]
        for row, w in batch:
            seed = upstream.new_zeros((upstream.shape[1],) + plan.roi_size)
            total = plan.weight_sum[0, 0][plan.window_slices(w)]
            # the window on the unpadded grid (padding receives no gradient: the output is cropped)
            src, dst = [], []
            for start, r, off, n in zip(plan.windows[w], plan.roi_size, offsets, plan.spatial_shape):
                lo, hi = max(start - off, 0), min(start - off + r, n)
                src.append(slice(lo, hi))
                dst.append(slice(lo - (start - off), hi - (start - off)))
            seed[(slice(None),) + tuple(dst)] = upstream[(row, slice(None)) + tuple(src)]
            parts.append(seed * (plan.weight / total))
        return torch.stack(parts)

    def _unpad_gradient(self, x: Tensor, dxp: Tensor, plan: WindowPlan) -> Tensor:
        """dF/dx from dF/d(padded x): the adjoint of the padding (a crop for constant padding)."""
        if not any(a or b for a, b in plan.pad):
            return dxp
        if self.padding_mode == "constant":
            return dxp[(slice(None), slice(None)) + plan.crop].contiguous()
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._pad(leaf, plan), leaf, grad_outputs=dxp)
        return grad


def _score_and_gradient(score_fn: Callable[[Tensor], Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """Scores (N,) of the stitched output ``y`` and dF/dY (summed over rows: rows are independent)."""
    with torch.enable_grad():
        leaf = y.detach().requires_grad_(True)
        scores = score_fn(leaf)
        if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.shape[0] != y.shape[0]:
            raise ValueError(f"score_fn must return one score per row, shape ({y.shape[0]},), got "
                             f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
        if not scores.requires_grad:
            return scores.detach(), torch.zeros_like(y)
        (grad,) = torch.autograd.grad(scores.sum(), leaf, allow_unused=True)
    return scores.detach(), torch.zeros_like(y) if grad is None else grad


def _per_axis(value, ndim: int, name: str, kind=float) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (kind(value),) * ndim
    values = tuple(kind(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value or one per spatial axis ({ndim}), got {value!r}")
    return values


def _roi_for(roi_size, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The window size on a volume of ``shape``: entries None or <= 0 take the whole axis."""
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi_size = (roi_size,) * len(shape)
    roi_size = tuple(roi_size)
    if len(roi_size) != len(shape):
        raise ValueError(f"roi_size {roi_size} has {len(roi_size)} axes but the input has {len(shape)} spatial "
                         f"axes {shape}")
    return tuple(n if r is None or int(r) <= 0 else int(r) for r, n in zip(roi_size, shape))
