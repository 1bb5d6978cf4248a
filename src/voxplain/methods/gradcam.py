"""Grad-CAM, guided Grad-CAM and layer-by-layer Grad-CAM ("network inspection").

Grad-CAM (Selvaraju et al. 2017) at a layer with output A (N, C, *s):
alpha_c = mean over space of dF/dA_c, cam = ReLU(sum_c alpha_c A_c), upsampled
to the input's spatial size by (bi/tri)linear interpolation, align_corners=False.
Guided Grad-CAM multiplies guided backpropagation by that map, per input channel.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import Engine
from .base import Method, Run
from .guided_backprop import warn_if_unguided
from .layer_select import check_cam_layer, default_cam_layer, inspection_layers, resolve_layer, shared_trace
from .registry import register

__all__ = ["GradCAM", "GuidedGradCAM", "gradcam_per_layer", "cam_from_gradients", "upsample_cam"]

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
    """The ``layer`` option shared by Grad-CAM and guided Grad-CAM, resolved per model."""

    layer: str | nn.Module | None

    def _resolve(self, engine: Engine, x: Tensor) -> nn.Module:
        trace = shared_trace(engine, x)
        if self.layer is None:
            module = default_cam_layer(engine, x, trace)
        else:
            module = resolve_layer(engine.model, self.layer)
            check_cam_layer(trace, module, x, self.layer if isinstance(self.layer, str) else None)
        # weak: a method object the user keeps must not keep their model alive
        self._resolved = (weakref.ref(engine.model), tuple(x.shape[1:]), weakref.ref(module))
        return module

    def layers(self, engine: Engine, x: Tensor) -> list[nn.Module]:
        """The CAM layer, captured in the shared plain gradient pass."""
        return [self._resolve(engine, x)]

    def cam(self, run: Run) -> Tensor:
        """Upsampled Grad-CAM (N, 1, *spatial) for ``run``, from the shared pass when it captured the layer."""
        resolved = getattr(self, "_resolved", None)
        if resolved is not None and resolved[0]() is run.engine.model and resolved[1] == tuple(run.x.shape[1:]):
            layer = resolved[2]()
        else:
            layer = self._resolve(run.engine, run.x)
        shared = run.cached_gradients() if any(m is layer for m in run.layers) else None
        if shared is not None:  # an earlier method made the shared pass: it captured this layer
            grads, i = shared, run.layer_index(layer)
        else:  # a pass of its own whose backward stops at the layer (as cheap as Grad-CAM can be)
            grads = run.engine.gradients(run.x, run.target, run.sample_index, layers=[layer],
                                         input_gradient=False)
            i = 0
        cam = cam_from_gradients(grads.activations[i], grads.layer_gradients[i])
        return upsample_cam(cam, run.x.shape[2:])


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

    def attribute(self, run: Run) -> Tensor:
        return self.cam(run)


@register
class GuidedGradCAM(_LayerOption, Method):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM, per input channel.

    Args:
        layer: the Grad-CAM layer, as for :class:`GradCAM`.

    Reuses the guided pass of guided backprop and the plain pass of Grad-CAM when
    run together through :func:`voxplain.explain`.
    """

    name = "guided_gradcam"

    def __init__(self, layer: str | nn.Module | None = None) -> None:
        self.layer = layer

    def attribute(self, run: Run) -> Tensor:
        warn_if_unguided(run.engine)
        return run.input_gradients(guided=True).inputs * self.cam(run)


def gradcam_per_layer(model: nn.Module, x, target=None, layers: Sequence[str | nn.Module] | None = None,
                      device=None, batch_size: int | None = None, memory_budget: int | str | None = None,
                      upsample: bool = True) -> dict[str, Tensor]:
    """Grad-CAM at many layers in one forward/backward pass ("network inspection").

    Args:
        model: the network; it comes back unchanged.
        x: input (B, C, *spatial), 1 to 3 spatial dimensions.
        target: what to explain, as for :func:`voxplain.explain`.
        layers: names or modules; default one per convolution in execution order,
            taken at the end of its conv/norm/activation block
            (:func:`~voxplain.methods.layer_select.inspection_layers`).
        device, batch_size, memory_budget: as for :func:`voxplain.explain`.
        upsample: resize every map to the input's spatial size (else keep the layer's).

    Returns:
        ``{layer name: CPU float32 map (B, 1, *spatial)}`` in execution order.
    """
    from ..explain import _forward_original, check_input
    from ..targets import as_target

    x = check_input(x)
    target = as_target(target)
    with Engine(model, device=device, batch_size=batch_size, memory_budget=memory_budget) as engine:
        xd = x.to(engine.device)
        bound = target.bind(_forward_original(engine, xd))
        trace = engine.trace(xd)
        if layers is None:
            chosen = inspection_layers(engine, xd, trace)
            if not chosen:
                raise ValueError(f"{type(model).__name__} has no convolution with a spatial output on input "
                                 f"shape {tuple(x.shape)}; pass `layers` explicitly")
        else:
            names = {m: n for n, m in reversed(list(model.named_modules()))}
            chosen = []
            for layer in layers:
                module = resolve_layer(model, layer)
                check_cam_layer(trace, module, xd, layer if isinstance(layer, str) else None)
                chosen.append((layer if isinstance(layer, str) else names[module], module))
            order = {id(info.module): k for k, info in enumerate(trace)}
            chosen.sort(key=lambda pair: order[id(pair[1])])
        modules = list(dict.fromkeys(m for _, m in chosen))
        grads = engine.gradients(xd, bound, torch.arange(x.shape[0], device=engine.device),
                                 layers=modules, input_gradient=False)
        out: dict[str, Tensor] = {}
        for name, module in chosen:
            i = modules.index(module)
            cam = cam_from_gradients(grads.activations[i], grads.layer_gradients[i])
            if upsample:
                cam = upsample_cam(cam, x.shape[2:])
            out[name] = cam.detach().to("cpu", torch.float32)
    return out
