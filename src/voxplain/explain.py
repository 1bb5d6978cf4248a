"""The public entry point: explain one input with several methods, sharing work."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import Engine
from .methods import Method, Run, create_method
from .targets import BoundTarget, Target, as_target

__all__ = ["explain", "explain_detailed", "Explanation", "DEFAULT_METHODS", "check_input"]

#: NeuroXAI's seven methods, run when no list is given.
DEFAULT_METHODS = (
    "vanilla_gradient",
    "guided_backprop",
    "integrated_gradients",
    "guided_ig",
    "smoothgrad",
    "gradcam",
    "guided_gradcam",
)


@dataclass
class Explanation:
    """Maps and the facts about how they were made."""

    maps: dict[str, Tensor]
    seconds: dict[str, float]
    options: dict[str, dict[str, Any]]
    output: Tensor  # model output on the input, CPU
    target: dict[str, Any]  # description of the bound target
    scores: Tensor  # explained score per sample, CPU
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific results (e.g. XRAI regions)


def check_input(x) -> Tensor:
    """Return ``x`` as a float32 tensor of shape (B, C, *spatial), or raise a clear error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor or numpy array of shape (B, C, *spatial), "
                        f"got {type(x).__name__}")
    if not 3 <= x.ndim <= 5:
        raise ValueError(
            f"input must have shape (B, C, *spatial) with 1 to 3 spatial dimensions (3 to 5 dims in all), "
            f"got {x.ndim} dim(s) with shape {tuple(x.shape)}; add the batch/channel axes with "
            "x[None] or x[None, None]"
        )
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    if x.numel() == 0:
        raise ValueError(f"input is empty: shape {tuple(x.shape)}")
    # One reduction finds NaN/Inf (they propagate through a sum); only then, or on an
    # overflowing sum of finite values, is the element-wise check run.
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(
            f"input contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite value(s); "
            "explanations need finite inputs"
        )
    return x.detach().to(torch.float32)


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return None


def _forward_original(engine: Engine, x: Tensor) -> Tensor:
    try:
        return engine.forward(x, keep_graph=True)
    except Exception as err:
        expected = _first_conv_channels(engine.model)
        hint = ""
        if expected is not None and expected != x.shape[1]:
            hint = f" (its first convolution expects {expected} channel(s), the input has {x.shape[1]})"
        raise ValueError(
            f"the model could not run on the input of shape {tuple(x.shape)}{hint}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _make_methods(methods, options: Mapping[str, Mapping[str, Any]] | None) -> list[Method]:
    if methods is None:
        methods = DEFAULT_METHODS
    if isinstance(methods, (str, Method)):
        methods = [methods]
    options = dict(options or {})
    built: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            built.append(m)
        else:
            built.append(create_method(m, options.get(m)))
    names = [m.name for m in built]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method(s) {duplicates} given more than once")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for method(s) {stray} that are not among the methods run: {names}")
    return built


def explain_detailed(model: nn.Module, x, target=None, methods: Sequence[str | Method] | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None, device=None,
                     batch_size: int | None = None, memory_budget: int | str | None = None,
                     seed: int = 0, progress: bool = False) -> Explanation:
    """Like :func:`explain`, but also returns timings, options, the output and the target."""
    x = check_input(x)
    target: Target = as_target(target)
    method_objs = _make_methods(methods, options)
    engine = Engine(model, device=device, batch_size=batch_size, memory_budget=memory_budget,
                    progress=progress)
    with engine:
        xd = x.to(engine.device)
        output = _forward_original(engine, xd)
        bound: BoundTarget = target.bind(output)
        layers: list[nn.Module] = []
        for m in method_objs:
            for layer in m.layers(engine, xd):
                if all(layer is not seen for seen in layers):
                    layers.append(layer)
        sample_index = torch.arange(x.shape[0], device=engine.device)
        run = Run(engine, xd, bound, sample_index, seed=seed, layers=layers)
        scores = bound.score(output, sample_index).cpu()
        maps, seconds = {}, {}
        extras: dict[str, Any] = {}
        for m in method_objs:
            start = time.perf_counter()
            result = m.attribute(run)
            engine.release_graph()  # the kept first pass serves the first method only
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            seconds[m.name] = time.perf_counter() - start
            maps[m.name] = result.detach().to("cpu", torch.float32)
            extra = getattr(m, "last_extras", None)
            if extra is not None:
                extras[m.name] = extra
    return Explanation(maps=maps, seconds=seconds, options={m.name: m.options() for m in method_objs},
                       output=output.detach().cpu(), target=bound.describe(), scores=scores,
                       extras=extras)


def explain(model: nn.Module, x, target=None, methods: Sequence[str | Method] | None = None,
            options: Mapping[str, Mapping[str, Any]] | None = None, device=None,
            batch_size: int | None = None, memory_budget: int | str | None = None,
            seed: int = 0, progress: bool = False) -> dict[str, Tensor]:
    """Explain ``model``'s decision on ``x`` with several methods.

    Args:
        model: any differentiable PyTorch model; it comes back unchanged.
        x: input of shape (B, C, *spatial), 1 to 3 spatial dimensions.
        target: what to explain: an int class, ``None`` (the predicted class), or a
            :class:`~voxplain.ClassTarget`, :class:`~voxplain.SegmentationTarget`,
            :class:`~voxplain.BratsRegionTarget`.
        methods: registry names (or method objects); default NeuroXAI's seven.
        options: per-method options, e.g. ``{"integrated_gradients": {"steps": 64}}``.
        device: where to compute (default: the model's device).
        batch_size: rows per forward/backward pass (overrides ``memory_budget``).
        memory_budget: bytes or a string like ``"2GB"`` one pass may use (default 2 GB).
        seed: seed for random methods; the same seed gives the same maps.
        progress: show progress bars.

    Returns:
        ``{method name: map}``: CPU float32 maps of the input's shape
        ((B, 1, *spatial) for single-channel methods such as Grad-CAM).
    """
    return explain_detailed(model, x, target, methods, options, device, batch_size, memory_budget,
                            seed, progress).maps
