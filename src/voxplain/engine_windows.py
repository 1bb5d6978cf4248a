"""The sliding-window branch of :class:`~voxplain.engine.Engine`: every pass through a :class:`SlidingWindow`.

An engine given a :class:`~voxplain.sliding_window.SlidingWindow` applies the model
to whole volumes the way MONAI's ``sliding_window_inference`` does, and every pass
the methods ask for goes through it:

* forward and scores: the stitched whole-volume output (each window batch through
  :meth:`Engine._call_model`), the target scoring that output;
* gradients: the exact gradient of the whole-volume score, one window batch at a
  time (:meth:`SlidingWindow.gradients`), with guided-backprop hooks installed
  around it and the captured layers turned into blended per-window Grad-CAMs
  (:attr:`voxplain.engine.Gradients.layer_maps`); a score affine in the output
  (``BoundTarget.affine_in_output``) takes one pass instead of two;
* the layer trace and layer activations (:meth:`Engine.trace`, :meth:`Engine.activations`)
  are taken on one window, the central one (:meth:`SlidingWindow.window`): what the model sees;
* memory: a pass takes as many rows as fit the budget after one window batch's
  forward/backward, each row costing its volume-sized buffers (padded input, its
  gradient, the stitched output and dF/dY).

There is no recorded first pass under sliding windows (its graph would span the
whole volume): :func:`voxplain.run.open_run` runs a plain forward instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .engine import Engine, Gradients
    from .targets import BoundTarget

__all__ = ["is_large_pass", "rows_per_pass", "forward", "scores", "gradients", "window_output_channels"]

_FLOAT_BYTES = 4


def _plan(engine: "Engine", row_shape: Sequence[int]):
    return engine.sliding_window.plan(tuple(row_shape[1:]), engine.device)


def window_output_channels(engine: "Engine", row_shape: Sequence[int]) -> int:
    """Output channels of the model on one window of a row of ``row_shape`` (one window forward, cached)."""
    plan = _plan(engine, row_shape)
    key = (int(row_shape[0]),) + plan.roi_size
    if key not in engine._window_channels:
        with torch.no_grad():
            out = engine._call_model(torch.zeros((1,) + key, device=engine.device))
        if not isinstance(out, Tensor) or out.ndim != len(key) + 1:
            raise ValueError(f"sliding-window explanation needs a model returning (b, K, *roi) per window; on a "
                             f"window of shape {(1,) + key} it returned "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        engine._window_channels[key] = int(out.shape[1])
    return engine._window_channels[key]


def is_large_pass(engine: "Engine", row_shape: Sequence[int]) -> bool:
    """Whether one window batch, or one row padded to the windows, is large enough to be sized before a pass."""
    plan = _plan(engine, row_shape)
    channels = int(row_shape[0])
    window_batch = (engine.sliding_window.sw_batch_size * channels,) + plan.roi_size
    return engine._is_large_row(window_batch) or engine._is_large_row((channels,) + tuple(plan.padded_shape))


def rows_per_pass(engine: "Engine", row_shape: Sequence[int], backward: bool = True) -> int:
    """Rows of shape (C, *spatial) per pass: the budget minus one window batch's need, over each row's buffers."""
    sw = engine.sliding_window
    plan = _plan(engine, row_shape)
    channels = int(row_shape[0])
    window_shape = (channels,) + plan.roi_size
    window_need = sw.sw_batch_size * engine._estimate_row_bytes(window_shape)
    outputs = window_output_channels(engine, row_shape)
    padded = math.prod(plan.padded_shape)
    if backward:  # rows, padded rows, their gradient and a path point; stitched output, dF/dY, its paste; a CAM
        per_row = _FLOAT_BYTES * padded * (4 * channels + 3 * outputs + 2)
    else:  # padded rows and the stitched output's accumulator and result
        per_row = _FLOAT_BYTES * padded * (channels + 2 * outputs)
        window_need = max(1, int(window_need / 3))
    free = engine.memory_budget - window_need
    if free < per_row:
        _refuse_or_warn(engine, plan, row_shape, window_need + per_row, backward)
    return max(1, int(free // per_row)) if free > 0 else 1


def _refuse_or_warn(engine: "Engine", plan, row_shape: Sequence[int], need: int, backward: bool) -> None:
    """One window batch and one row's volume buffers need more than the budget: refused when a budget was
    given (or the device lacks the memory), else one warning (passes then take one row)."""
    from .memory import format_bytes

    sw = engine.sliding_window
    what = (f"one batch of {sw.sw_batch_size} window(s) of {plan.roi_size} and the volume-sized buffers of one "
            f"row of shape {tuple(row_shape)} need about {format_bytes(need)} for a "
            f"{'forward and backward pass' if backward else 'forward pass'}")
    advice = "lower sw_batch_size (--sw-batch-size) or the window size (--roi), or crop the scan"
    engine.refuse_over_budget(need, what, advice)
    if not engine._window_budget_warned:
        engine._window_budget_warned = True
        warnings.warn(f"{what}, above the default pass size of {format_bytes(engine.memory_budget)}; passes take "
                      f"one row ({advice} to stay within it)", RuntimeWarning, stacklevel=4)


def forward(engine: "Engine", x: Tensor) -> Tensor:
    """The stitched output of rows ``x`` (no gradient), chunked."""
    sw = engine.sliding_window
    outs = [sw.forward(engine._call_model, x[sl].to(engine.device))
            for sl in engine.chunks(x.shape[0], x.shape[1:], backward=False)]
    return torch.cat(outs)


def scores(engine: "Engine", x: Tensor, target: "BoundTarget", sample_index: Tensor) -> Tensor:
    """Target scores of the stitched outputs of rows ``x`` (no gradient), chunked."""
    sw = engine.sliding_window
    outs = []
    with torch.no_grad():
        for sl in engine.chunks(x.shape[0], x.shape[1:], backward=False):
            out = sw.forward(engine._call_model, x[sl].to(engine.device))
            outs.append(target.score(out, sample_index[sl].to(engine.device)))
    return torch.cat(outs)


def gradients(engine: "Engine", x: Tensor, target: "BoundTarget", sample_index: Tensor,
              layers: Sequence[nn.Module], guided: bool | str, input_gradient: bool) -> "Gradients":
    """Scores and exact gradients of the whole-volume score, one window batch at a time, chunked over rows.

    Captured ``layers`` come back as blended per-window Grad-CAMs in ``Gradients.layer_maps``
    (no whole-volume activations exist to return).
    """
    from .engine import Gradients

    sw = engine.sliding_window
    affine = bool(getattr(target, "affine_in_output", False))
    parts = []
    for sl in engine.chunks(x.shape[0], x.shape[1:]):
        rows = x[sl].detach().to(engine.device)
        owner = sample_index[sl].to(engine.device)
        with engine._hooks((), guided):
            result = sw.gradients(engine._call_model, rows, lambda y, owner=owner: target.score(y, owner),
                                  capture=layers, input_gradient=input_gradient, affine_score=affine)
        parts.append(Gradients(scores=result.scores, inputs=result.inputs, layer_maps=result.layer_maps))
    return Gradients.concat(parts)
