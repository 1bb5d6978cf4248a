"""Choosing the layer a class-activation map is taken at.

Grad-CAM needs one module whose output is a spatial feature map (N, C, *spatial)
with as many spatial dimensions as the input. This module turns what a user gives
(a name from ``named_modules()`` or the module itself) into a checked module, picks
a sensible default, and lists the layers "network inspection" walks through.

All choices are made from a trace (:meth:`voxplain.Engine.trace`, kept once per input
by :meth:`voxplain.run.Run.trace`): the modules in the order their forward hooks fire
(a container fires after its children), with output shapes.
"""

from __future__ import annotations

import difflib
from collections import Counter

from torch import Tensor, nn

from ..engine import Engine, LayerInfo

__all__ = ["NORMALISATIONS", "resolve_layer", "check_cam_layer", "default_cam_layer",
           "inspection_layers"]

#: Normalisation layers. One that follows a layer makes a poor CAM layer: InstanceNorm
#: removes each channel's spatial mean, so dF/dA sums to zero over space and every
#: Grad-CAM weight (its spatial mean) is zero; Group/LayerNorm do the same per group.
NORMALISATIONS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)

# Modules that may sit between a convolution and the end of its block.
_BLOCK_TAIL: tuple[type[nn.Module], ...] = NORMALISATIONS + (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.RReLU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_CONVS = (nn.modules.conv._ConvNd,)


def _names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    return names


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """The module ``layer`` names in ``model`` (a ``named_modules()`` name, or the module itself).

    Raises:
        ValueError: an unknown name (the message lists the available names) or a
            module that is not part of ``model``.
        TypeError: ``layer`` is neither a string nor a module.
    """
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"the layer given ({type(layer).__name__}) is not a submodule of the model "
                             f"({type(model).__name__}); pass one of its modules or a name from named_modules()")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    available = [n for n in modules if n]
    close = difflib.get_close_matches(layer, available, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown layer {layer!r} in {type(model).__name__}.{hint} "
                     f"Available layers: {', '.join(available) or 'none (the model has no submodules)'}")


def _is_spatial(info: LayerInfo, spatial_dims: int) -> bool:
    shape = info.output_shape
    return shape is not None and len(shape) == spatial_dims + 2 and any(s > 1 for s in shape[2:])


def check_cam_layer(trace: list[LayerInfo], layer: nn.Module, x: Tensor, name: str | None = None) -> None:
    """Raise a clear error unless ``layer`` runs once on ``x`` with a spatial tensor output."""
    seen = [info for info in trace if info.module is layer]
    label = repr(name) if name else type(layer).__name__
    if not seen:
        raise ValueError(f"layer {label} does not run in the model's forward pass on this input; "
                         "choose a layer that the forward pass uses")
    if len(seen) > 1:
        raise ValueError(f"layer {label} runs {len(seen)} times in one forward pass, so its output is "
                         "ambiguous; choose a layer that runs once (or its parent block)")
    shape = seen[0].output_shape
    d = x.ndim - 2
    if shape is None:
        raise ValueError(f"layer {label} does not return a tensor; Grad-CAM needs a layer whose output "
                         f"is a feature map (N, C, *spatial)")
    if not _is_spatial(seen[0], d):
        raise ValueError(f"layer {label} outputs shape {shape}, which is not a spatial feature map: Grad-CAM "
                         f"needs a layer with output (N, C, *spatial) with {d} spatial dimension(s) like the "
                         f"input {tuple(x.shape)}, not all of size 1")


def default_cam_layer(engine: Engine, x: Tensor, trace: list[LayerInfo] | None = None) -> nn.Module:
    """The default Grad-CAM layer of ``engine.model`` on ``x``.

    Rule: the last module, in the order modules finish during the forward pass
    (containers included, the model itself excluded), that

    * returns a tensor with the input's number of spatial dimensions, not all of size 1;
    * runs exactly once (a shared module, e.g. one ReLU reused in a block, has no
      single output to capture); and
    * is not immediately followed by a normalisation layer (a conv feeding
      InstanceNorm gives an all-zero CAM, see :data:`NORMALISATIONS`).

    On a classifier this is the last feature map before global pooling (for a
    ResNet the last residual stage, for a plain conv stack its last activation).
    On a dense-prediction (segmentation) network, whose last module returns a map
    of the input's spatial size, the trailing modules that return the output's
    shape (the head and its wrappers) are passed over: Grad-CAM at the head is only
    the rectified logit map itself. The default there is the last decoder feature map.
    """
    trace = engine.trace(x) if trace is None else trace
    counts = Counter(id(info.module) for info in trace)
    d = x.ndim - 2
    end = len(trace)
    final = trace[-1].output_shape if trace else None
    if final is not None and len(final) == x.ndim and tuple(final[2:]) == tuple(x.shape[2:]):
        while end > 0 and trace[end - 1].output_shape == final:
            end -= 1
        if not any(_is_spatial(info, d) for info in trace[:end]):
            end = len(trace)  # nothing before the head: keep it
    for i in range(end - 1, -1, -1):
        info = trace[i]
        if counts[id(info.module)] != 1 or not _is_spatial(info, d):
            continue
        if i + 1 < len(trace) and isinstance(trace[i + 1].module, NORMALISATIONS):
            continue
        return info.module
    raise ValueError(f"found no layer of {type(engine.model).__name__} with a spatial output for input "
                     f"shape {tuple(x.shape)}; pass `layer` explicitly")


def inspection_layers(engine: Engine, x: Tensor, trace: list[LayerInfo] | None = None) -> list[tuple[str, nn.Module]]:
    """The layers of a layer-by-layer Grad-CAM ("network inspection"), in execution order.

    One entry per convolution that runs once: the convolution's block output,
    i.e. the last module of the run ``conv [-> norm] [-> activation] [-> dropout]``
    that directly follows it and runs once (so a conv feeding InstanceNorm is
    inspected after the norm, where its CAM is not zero). Returns (name, module) pairs.
    """
    trace = engine.trace(x) if trace is None else trace
    counts = Counter(id(info.module) for info in trace)
    names = _names(engine.model)
    d = x.ndim - 2
    chosen: list[tuple[str, nn.Module]] = []
    for i, info in enumerate(trace):
        if not isinstance(info.module, _CONVS) or counts[id(info.module)] != 1 or not _is_spatial(info, d):
            continue
        pick = info.module
        for nxt in trace[i + 1:]:
            if any(True for _ in nxt.module.children()):
                continue  # a container finishing adds no computation of its own here
            if not isinstance(nxt.module, _BLOCK_TAIL) or nxt.output_shape != info.output_shape:
                break
            if counts[id(nxt.module)] == 1:
                pick = nxt.module
        if all(pick is not m for _, m in chosen):
            chosen.append((names[pick], pick))
    return chosen
