"""Open an :class:`~voxplain.engine.Engine` on a model and bind a target, for metrics that run the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine import Engine
from ..explain import check_input
from ..targets import BoundTarget, as_target

__all__ = ["Prepared", "prepared", "blur"]


@dataclass
class Prepared:
    """A prepared engine, the input on its device, the target bound to the model's output on it."""

    engine: Engine
    x: Tensor
    target: BoundTarget
    output: Tensor
    sample_index: Tensor


@contextlib.contextmanager
def prepared(model: nn.Module, x, target=None, device=None, batch_size: int | None = None,
             memory_budget=None, progress: bool = False) -> Iterator[Prepared]:
    """Yield a :class:`Prepared` for ``model`` at ``x``; the model is restored on exit."""
    x = check_input(x)
    tgt = as_target(target)
    engine = Engine(model, device=device, batch_size=batch_size, memory_budget=memory_budget,
                    progress=progress)
    with engine:
        xd = x.to(engine.device)
        output = engine.forward(xd)
        bound = tgt.bind(output)
        yield Prepared(engine, xd, bound, output, torch.arange(x.shape[0], device=engine.device))


def blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur over the spatial axes of (B, C, *spatial), zero padding, any device."""
    if sigma <= 0:
        return x.clone()
    from scipy import ndimage

    spatial = x.ndim - 2
    arr = x.detach().cpu().double().numpy()
    sig = (0, 0) + (float(sigma),) * spatial
    out = ndimage.gaussian_filter(arr, sigma=sig, mode="constant", cval=0.0, truncate=3.0)
    return torch.from_numpy(out).to(x.device, x.dtype)
