"""The public entry points: explain one input with several methods (sharing work), and
Grad-CAM at many layers ("network inspection")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .methods import DEFAULT_METHODS, Method, create_methods
from .methods.gradcam import layer_cams
from .run import Explanation, check_input, open_run

__all__ = ["explain", "explain_detailed", "gradcam_per_layer", "Explanation", "DEFAULT_METHODS", "check_input"]


def explain_detailed(model: nn.Module, x, target=None, methods: Sequence[str | Method] | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None, device=None,
                     batch_size: int | None = None, memory_budget: int | str | None = None,
                     seed: int = 0, progress: bool = False, output_key=None,
                     sliding_window=None, fold_batchnorm: bool = False) -> Explanation:
    """Like :func:`explain`, but also returns timings, options, extras, the output and the target.

    ``Explanation.extras[method]`` is a dict for every method: IG-type methods
    (integrated_gradients, guided_ig, blur_ig, xrai's base IG) report
    ``"completeness"`` (per sample ``error``, ``attribution_sum``, ``score_difference``);
    any method may report ``"warnings"``.
    """
    return _explain(model, x, target, methods, options, device, batch_size, memory_budget, seed, progress,
                    output_key, sliding_window, fold_batchnorm, outputs=True)


def _explain(model, x, target, methods, options, device, batch_size, memory_budget, seed, progress, output_key,
             sliding_window, fold_batchnorm, outputs: bool) -> Explanation:
    method_objs = create_methods(methods, options)
    with open_run(model, x, target, methods=method_objs, device=device, batch_size=batch_size,
                  memory_budget=memory_budget, progress=progress, seed=seed, output_key=output_key,
                  sliding_window=sliding_window, defer_forward=True, fold_batchnorm=fold_batchnorm) as run:
        return run.explain(method_objs, outputs=outputs)


def explain(model: nn.Module, x, target=None, methods: Sequence[str | Method] | None = None,
            options: Mapping[str, Mapping[str, Any]] | None = None, device=None,
            batch_size: int | None = None, memory_budget: int | str | None = None,
            seed: int = 0, progress: bool = False, output_key=None,
            sliding_window=None, fold_batchnorm: bool = False) -> dict[str, Tensor]:
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
        memory_budget: bytes or a string like ``"2GB"`` (units B, KB, MB, GB, TB) one pass may
            use. An input row that alone needs more is refused before it runs, with the
            estimated need. Without it, passes are sized to 2 GB and a larger row runs
            alone if the device has the memory free.
        seed: seed for random methods; the same seed gives the same maps.
        progress: show progress bars.
        output_key: for a model that returns a tuple, list or dict, the index or key of
            the output tensor to explain (e.g. ``0`` or ``"logits"``).
        sliding_window: apply a patch-trained model to the whole volume window by window,
            exactly as MONAI's ``sliding_window_inference`` does, e.g.
            ``{"roi_size": (96, 96, 96), "overlap": 0.5, "mode": "gaussian"}`` (keys: those of
            :class:`~voxplain.sliding_window.SlidingWindow`) or a ``SlidingWindow``. The
            target scores the stitched whole-volume output; every method explains that
            score, computed one window batch at a time (memory bounded by one window
            batch, not by the volume); Grad-CAM is the per-window CAM blended with the
            windows' weights.
        fold_batchnorm: opt in to running the passes at points derived from the input (path
            points, noisy and occluded copies) with eval-mode batch norms folded into the
            convolution before them: integrated gradients, SmoothGrad and occlusion run about
            1.2-1.3x faster on BatchNorm CNNs, but the folded weights are rounded to float32
            once more, which moves the maps by that rounding times the model's condition (on
            an untrained 3D U-Net with random BatchNorm statistics, IG 7.5e-4 from its
            float64 value against 1.1e-4 as the model came). Guided IG and Blur IG never fold.

    Returns:
        ``{method name: map}``: CPU float32 maps of the input's shape
        ((B, 1, *spatial) for single-channel methods such as Grad-CAM).
    """
    # maps only: the model's output at x is not computed where no method needs it
    return _explain(model, x, target, methods, options, device, batch_size, memory_budget,
                    seed, progress, output_key, sliding_window, fold_batchnorm, outputs=False).maps


def gradcam_per_layer(model: nn.Module, x, target=None, layers: Sequence[str | nn.Module] | None = None,
                      device=None, batch_size: int | None = None, memory_budget: int | str | None = None,
                      upsample: bool = True, output_key=None,
                      sliding_window=None) -> dict[str, Tensor]:
    """Grad-CAM at many layers in one forward/backward pass ("network inspection").

    Args:
        model: the network; it comes back unchanged.
        x: input (B, C, *spatial), 1 to 3 spatial dimensions.
        target: what to explain, as for :func:`explain`.
        layers: names or modules; default one per convolution in execution order,
            taken at the end of its conv/norm/activation block
            (:func:`~voxplain.methods.layer_select.inspection_layers`).
        device, batch_size, memory_budget, output_key: as for :func:`explain`.
        upsample: resize every map to the input's spatial size (else keep the layer's).
        sliding_window: as for :func:`explain` (the CAMs are then blended per-window CAMs).

    Returns:
        ``{layer name: CPU float32 map (B, 1, *spatial)}`` in execution order.
    """
    with open_run(model, x, target, device=device, batch_size=batch_size, memory_budget=memory_budget,
                  output_key=output_key,
                  sliding_window=sliding_window) as run:
        cams = layer_cams(run, layers, upsample=upsample)
    return {name: cam.detach().to("cpu", torch.float32) for name, cam in cams.items()}
