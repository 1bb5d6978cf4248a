"""Baselines of path methods (integrated gradients, Guided IG).

A baseline is the reference input a path method starts from. It is given as:

* ``"zeros"``: all zeros (the default of the references);
* ``"min"`` / ``"max"``: every element set to the sample's smallest / largest value,
  taken over all channels and voxels of that sample (PAIR XRAI's black and white
  baselines are ``min(x)`` and ``max(x)`` of the image);
* ``"blur"`` or ``"blur:SIGMA"``: the input blurred over its spatial axes by a
  Gaussian of standard deviation SIGMA voxels (default 5), zero padding at the border;
* a number: that constant everywhere;
* a tensor (or numpy array) broadcastable to the input (N, C, *spatial), e.g.
  (C, *spatial) or (1, C, *spatial); one of shape (B, C, *spatial) for the B
  original samples also serves rows derived from them (noisy copies).
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["BaselineSpec", "DEFAULT_BLUR_SIGMA", "check_baseline", "resolve_baseline"]

BaselineSpec = Union[str, float, int, Tensor, np.ndarray]

#: Standard deviation, in voxels, of the ``"blur"`` baseline when none is given.
DEFAULT_BLUR_SIGMA = 5.0
_NAMES = ("zeros", "min", "max", "blur")


def _parse_blur(spec: str) -> float:
    """Sigma of a ``"blur"`` / ``"blur:SIGMA"`` baseline."""
    if spec == "blur":
        return DEFAULT_BLUR_SIGMA
    try:
        sigma = float(spec.split(":", 1)[1])
    except ValueError:
        sigma = float("nan")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"baseline {spec!r}: expected 'blur:SIGMA' with SIGMA a number >= 0 (voxels)")
    return sigma


def check_baseline(spec: BaselineSpec) -> BaselineSpec:
    """Validate a baseline option without an input at hand; return it (arrays as tensors)."""
    if isinstance(spec, str):
        if spec.startswith("blur:"):
            _parse_blur(spec)
        elif spec not in _NAMES:
            raise ValueError(
                f"baseline must be one of {', '.join(repr(n) for n in _NAMES)}, 'blur:SIGMA', "
                f"a number or a tensor; got {spec!r}"
            )
        return spec
    if isinstance(spec, bool):
        raise TypeError("baseline must be a name, a number or a tensor, got a bool")
    if isinstance(spec, numbers.Real):
        if not math.isfinite(float(spec)):
            raise ValueError(f"a constant baseline must be finite, got {spec!r}")
        return float(spec)
    if isinstance(spec, np.ndarray):
        spec = torch.from_numpy(np.ascontiguousarray(spec))
    if isinstance(spec, Tensor):
        if not spec.is_floating_point() and spec.dtype not in (torch.int16, torch.int32, torch.int64,
                                                                torch.uint8, torch.int8):
            raise TypeError(f"a baseline tensor must hold numbers, got dtype {spec.dtype}")
        if not bool(torch.isfinite(spec.float()).all()):
            raise ValueError("the baseline tensor contains NaN or infinite values")
        return spec.detach()
    raise TypeError(
        f"baseline must be 'zeros', 'min', 'max', 'blur', 'blur:SIGMA', a number or a tensor; "
        f"got {type(spec).__name__}"
    )


def resolve_baseline(spec: BaselineSpec, x: Tensor, sample_index: Tensor | None = None,
                     batch: int | None = None) -> Tensor:
    """The baseline for rows ``x`` (N, C, *spatial), as a tensor of ``x``'s shape, dtype and device.

    Args:
        spec: the baseline option (see the module docstring).
        x: the rows being explained.
        sample_index: (N,) original sample of each row; lets a (B, C, *spatial)
            baseline serve rows derived from the B original samples.
        batch: the number B of original samples (default: ``sample_index.max() + 1``).
    """
    spec = check_baseline(spec)
    if isinstance(spec, str):
        if spec == "zeros":
            return torch.zeros_like(x)
        if spec in ("min", "max"):
            flat = x.flatten(1)
            value = flat.amin(dim=1) if spec == "min" else flat.amax(dim=1)
            return value.view(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()
        from .blur_ig import gaussian_blur  # the one N-D Gaussian blur of the package

        return gaussian_blur(x, _parse_blur(spec))
    if isinstance(spec, float):
        return torch.full_like(x, spec)
    base = spec.to(device=x.device, dtype=x.dtype)
    row_shape = tuple(x.shape[1:])
    if base.ndim == x.ndim and base.shape[0] > 1 and sample_index is not None:
        b = batch if batch is not None else int(sample_index.max()) + 1
        # One baseline per original sample: each row takes its own sample's, also
        # when the rows are derived copies (whose count may happen to equal B).
        if base.shape[0] == b:
            base = base[sample_index.to(x.device)]
    try:
        return torch.broadcast_to(base, x.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"baseline tensor of shape {tuple(spec.shape)} does not match the input: expected a shape "
            f"broadcastable to {tuple(x.shape)}, e.g. {row_shape} or (1, {', '.join(map(str, row_shape))})"
        ) from None
