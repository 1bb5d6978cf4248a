"""Grad-CAM, guided Grad-CAM and layer-by-layer Grad-CAM ("network inspection").

Grad-CAM (Selvaraju et al. 2017) at a layer with output A (N, C, *s):
alpha_c = mean over space of dF/dA_c, cam = ReLU(sum_c alpha_c A_c), upsampled
to the input's spatial size by (bi/tri)linear interpolation, align_corners=False.
Guided Grad-CAM multiplies guided backpropagation by that map, per input channel.

Under sliding windows (a patch-trained model applied window by window) a layer's
output exists per window only: the CAM is taken per window, with the exact
gradient of the whole-volume score, upsampled to the window and blended over the
volume with the windows' own weights (:mod:`voxplain.sliding_window`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attribution, Method
from .guided_backprop import check_activations, warn_unguided
from .layer_select import check_cam_layer, default_cam_layer, inspection_layers, resolve_layer
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["GradCAM", "GuidedGradCAM", "layer_cams", "cam_from_gradients", "upsample_cam"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def cam_from_gradients(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM at the layer's resolution: ReLU(sum_c mean_space(dF/dA_c) * A_c), shape (N, 1, *s)."""
    alpha = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
    return torch.relu((alpha * activation).sum(dim=1, keepdim=True))


def upsample_cam(cam: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a (N, 1, *s) map to ``size`` by (bi/tri)linear interpolation, align_corners=False."""
    size = tuple(int(s) for s in size)
    if tuple(cam.shape[2:]) == size:
        return cam
    return F.interpolate(cam, size=size, mode=_MODES[cam.ndim - 2], align_corners=False)


class _LayerOption:
    """The ``layer`` option shared by Grad-CAM and guided Grad-CAM, resolved once per run's input."""

    layer: str | nn.Module | None

    def cam_layer(self, run: "Run") -> nn.Module:
        """The module the CAM is taken at, checked against the run's trace."""
        key = ("cam layer", self.layer if isinstance(self.layer, (str, type(None))) else id(self.layer))
        return run.resolved(key, lambda: _resolve_cam_layer(run, self.layer))

    def layers(self, run: "Run") -> list[nn.Module]:
        """The CAM layer, captured in the shared plain gradient pass."""
        return [self.cam_layer(run)]

    def cam(self, run: "Run") -> Tensor:
        """Upsampled Grad-CAM (N, 1, *spatial) for ``run`` (blended per-window CAMs under sliding windows)."""
        module = self.cam_layer(run)
        if run.sliding_window is not None:
            return run.layer_map(module)
        try:
            activation, gradient = run.layer_gradients(module)
        except RuntimeError:  # the layer did not run, or ran twice: say so as the trace does
            self._check(run, module)
            raise
        if activation.ndim != run.x.ndim or all(s == 1 for s in activation.shape[2:]):
            self._check(run, module)
        return upsample_cam(cam_from_gradients(activation, gradient), run.x.shape[2:])

    def _check(self, run: "Run", module: nn.Module) -> None:
        check_cam_layer(run.trace(), module, run.trace_rows, self.layer if isinstance(self.layer, str) else None)


def _resolve_cam_layer(run: "Run", layer: str | nn.Module | None) -> nn.Module:
    if layer is None:
        return default_cam_layer(run.engine, run.trace_rows, run.trace())
    # A given layer is checked against the pass that reads it (:meth:`_LayerOption.cam`), or
    # against the trace when there is one already (always under sliding windows, whose
    # blended CAM has no single pass to check against): no traced forward just to check it.
    module = resolve_layer(run.model, layer)
    if run.has_trace() or run.sliding_window is not None:
        check_cam_layer(run.trace(), module, run.trace_rows, layer if isinstance(layer, str) else None)
    return module


@register
class GradCAM(_LayerOption, Method):
    """Grad-CAM: ReLU of the gradient-weighted sum of a layer's feature maps, upsampled to the input.

    Args:
        layer: the layer, as a name from ``model.named_modules()`` or the module
            itself; ``None`` picks the default of
            :func:`~voxplain.methods.layer_select.default_cam_layer` (the last
            once-run module with a spatial output that feeds no normalisation layer).

    The map has one channel: (N, 1, *spatial).
    """

    name = "gradcam"
    single_channel = True

    def __init__(self, layer: str | nn.Module | None = None) -> None:
        self.layer = layer

    def attribute(self, run: "Run") -> Attribution:
        return Attribution(self.cam(run))


@register
class GuidedGradCAM(_LayerOption, Method):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM, per input channel.

    Args:
        layer: the Grad-CAM layer, as for :class:`GradCAM`.
        activations: the activations guided backprop guides, as for
            :class:`~voxplain.methods.guided_backprop.GuidedBackprop`.

    Reuses the guided pass of guided backprop and the plain pass of Grad-CAM when
    run together through :func:`voxplain.explain`.
    """

    name = "guided_gradcam"

    def __init__(self, layer: str | nn.Module | None = None, activations: str = "relu_family") -> None:
        self.layer = layer
        self.activations = check_activations(activations)

    def guided_input_gradient(self) -> str | None:
        return self.activations

    def attribute(self, run: "Run") -> Attribution:
        result = Attribution(run.input_gradients(guided=self.activations) * self.cam(run))
        warn_unguided(result, run, self.activations, self.name)
        return result


def layer_cams(run: "Run", layers: Sequence[str | nn.Module] | None = None,
               upsample: bool = True) -> dict[str, Tensor]:
    """Grad-CAM of ``run`` at many layers from one forward/backward pass stopping at them.

    Args:
        run: the input and target.
        layers: names or modules; default :func:`~voxplain.methods.layer_select.inspection_layers`.
        upsample: resize every map to the input's spatial size (else keep the layer's); under
            sliding windows the maps are blended over the volume, so always at its size.

    Returns:
        ``{layer name: map (N, 1, *spatial)}`` in execution order, on the run's device.
    """
    if run.sliding_window is not None and not upsample:
        raise ValueError("under sliding windows per-window CAMs are blended at the input's resolution; "
                         "upsample=False is not available")
    trace = run.trace()
    if layers is None:
        chosen = inspection_layers(run.engine, run.trace_rows, trace)
        if not chosen:
            raise ValueError(f"{type(run.model).__name__} has no convolution with a spatial output on input "
                             f"shape {tuple(run.x.shape)}; name a layer with a spatial output: `layers=[NAME]` "
                             "in the API (voxplain inspect: --layer NAME)")
    else:
        names = {m: n for n, m in reversed(list(run.model.named_modules()))}
        chosen = []
        for layer in layers:
            module = resolve_layer(run.model, layer)
            check_cam_layer(trace, module, run.trace_rows, layer if isinstance(layer, str) else None)
            chosen.append((layer if isinstance(layer, str) else names[module], module))
        order = {id(info.module): k for k, info in enumerate(trace)}
        chosen.sort(key=lambda pair: order[id(pair[1])])
    modules = list(dict.fromkeys(m for _, m in chosen))
    grads = run.gradients_at_layers(modules)
    out: dict[str, Tensor] = {}
    for name, module in chosen:
        i = modules.index(module)
        if grads.layer_maps:  # sliding windows: blended per-window CAMs
            out[name] = grads.layer_maps[i]
            continue
        cam = cam_from_gradients(grads.activations[i], grads.layer_gradients[i])
        out[name] = upsample_cam(cam, run.x.shape[2:]) if upsample else cam
    return out
