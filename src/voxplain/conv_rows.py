"""One-row 3D convolutions on the CPU, run as two rows so that PyTorch takes its fast kernels.

For a float32 3D convolution (or transposed convolution) on the CPU, PyTorch picks
oneDNN only for batches of two or more rows or large inputs; one small row goes to
its generic im2col kernels ("slow_conv3d"), which build the whole column matrix
(in-channels x kernel volume x output voxels) and run many times slower at the sizes
of medical volumes: measured on this project's 2-core reference machine, a 4->8 channel
3x3x3 convolution on one 48^3 row took 118 ms forward and backward, but 18 ms as two
rows; a MONAI U-Net's gradient on one 1x4x64^3 row took 2.6x less time. Explaining
one volume (a plain gradient, Grad-CAM, guided backprop, the first forward of a run)
is exactly that case, in voxplain and in every other library.

:class:`OneRowConvolutions` is a torch function mode the engine opens around a
one-row model call: each 3D convolution PyTorch would run on its generic kernel, and
whose column matrix is large enough for that to matter, runs on the row and a copy
of it, and hands back the first row's result. Nothing else changes: the convolution
computes the same values (to float rounding, ~1e-7 relative), the copy receives no
gradient, and hooks on the convolution modules see the one row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["OneRowConvolutions", "available"]

#: Below this many column-matrix entries (in-channels x kernel volume x output voxels, or
#: out-channels x kernel volume x input voxels for a transposed convolution) the generic
#: kernel is cheap and two rows cost more than one (measured: a 32->64 channel 3x3x3
#: convolution on 8^3, 0.44 M entries, takes the same time either way; smaller ones lose).
_MIN_COLUMNS = 512 * 1024

_CONV = torch.conv3d
_TRANSPOSED = torch.conv_transpose3d
# argument names after (input, weight), in the order the functions take them positionally
_CONV_ARGS = ("bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_ARGS = ("bias", "stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def available() -> bool:
    """True if PyTorch has oneDNN on this build and it is enabled (else there is nothing to gain)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch._C, "_select_conv_backend"))


class OneRowConvolutions(TorchFunctionMode):
    """While open, one-row 3D convolutions that PyTorch would run on its generic CPU kernel run as two rows.

    The decision is made once per convolution signature (shapes, stride, padding, ...) and
    remembered by this object, which an engine keeps for its lifetime.
    """

    def __init__(self) -> None:
        super().__init__()
        self._decided: dict[tuple, bool] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is _CONV or func is _TRANSPOSED) and args and isinstance(args[0], Tensor) \
                and args[0].shape[0] == 1 and self._worth_two_rows(func, args, kwargs):
            x = args[0]
            return func(torch.cat([x, x.detach()]), *args[1:], **kwargs)[:1]
        return func(*args, **kwargs)

    def _worth_two_rows(self, func, args: tuple, kwargs: dict) -> bool:
        params = _parameters(func, args, kwargs)
        if params is None:
            return False
        x, w = args[0], args[1]
        key = (func is _TRANSPOSED, tuple(x.shape), x.stride(), x.dtype, x.device.type, tuple(w.shape),
               *(tuple(params[k]) if isinstance(params[k], list) else params[k] for k in
                 ("stride", "padding", "dilation", "output_padding", "groups")), params["bias"] is not None)
        if key not in self._decided:
            self._decided[key] = _decide(func is _TRANSPOSED, x, w, params)
        return self._decided[key]


def _parameters(func, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The convolution's parameters as lists of three ints (None where a string padding or an
    unusual argument makes the call one to leave alone)."""
    if len(args) < 2 or not isinstance(args[1], Tensor) or args[0].ndim != 5:
        return None
    names = _TRANSPOSED_ARGS if func is _TRANSPOSED else _CONV_ARGS
    params = dict(_DEFAULTS)
    params.update(zip(names, args[2:]))
    params.update(kwargs)
    for k in ("stride", "padding", "dilation", "output_padding"):
        v = params[k]
        if isinstance(v, int):
            params[k] = [v] * 3
        elif isinstance(v, (tuple, list)) and len(v) == 3 and all(isinstance(i, int) for i in v):
            params[k] = list(v)
        else:
            return None  # e.g. padding="same": left to PyTorch as it is
    if not isinstance(params["groups"], int):
        return None
    return params


def _decide(transposed: bool, x: Tensor, w: Tensor, params: dict) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    kernel = math.prod(w.shape[2:])
    if kernel == 1:
        return False  # a 1x1x1 convolution builds no column matrix
    try:
        backend = torch._C._select_conv_backend(x, w, params["bias"], params["stride"], params["padding"],
                                                params["dilation"], transposed, params["output_padding"],
                                                params["groups"], None)
    except (RuntimeError, TypeError):
        return False
    slow = {torch._C._ConvBackend.Slow3d, torch._C._ConvBackend.SlowTranspose3d}
    if backend not in slow:
        return False
    if transposed:
        columns = w.shape[1] * kernel * math.prod(x.shape[2:])
    else:
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
               zip(x.shape[2:], params["padding"], params["dilation"], w.shape[2:], params["stride"])]
        columns = w.shape[1] * kernel * math.prod(out)
    return columns >= _MIN_COLUMNS
