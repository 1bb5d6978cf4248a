"""SmoothGrad (Smilkov et al. 2017) over any other method, with PAIR saliency's semantics.

The map is the mean over ``samples`` noisy copies x + N(0, sigma^2) of a base
method's map (of its square with ``magnitude=True``), where
sigma = noise_level * (max(x) - min(x)) per sample, as PAIR's ``GetSmoothedMask``.
The noisy copies are handed to the base method as the rows of one derived run,
so the engine batches them (in pieces sized to its memory budget).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .base import Attribution, Method
from .integrated_gradients import check_steps
from .registry import create_method, register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["SmoothGrad", "SmoothGradIG"]


@register
class SmoothGrad(Method):
    """Average of a base method's maps over noisy copies of the input.

    Args:
        base: the method to smooth: a registered name (default ``"vanilla_gradient"``)
            or a :class:`Method` instance.
        base_options: options of the base method when it is given by name (checked
            like any method's options).
        samples: number of noisy copies per input sample.
        noise_level: noise standard deviation as a fraction of each sample's value
            range, max(x) - min(x); 0 returns the base method's map itself.
        magnitude: average the squared maps instead of the maps.

    The noise is drawn on the CPU from the run's seed, one copy at a time, so a
    seed gives the same maps on any device and for any batch size.
    """

    name = "smoothgrad"

    def __init__(self, base: str | Method = "vanilla_gradient", base_options: dict[str, Any] | None = None,
                 samples: int = 25, noise_level: float = 0.15, magnitude: bool = False):
        if isinstance(base, Method):
            if base_options:
                raise ValueError("base_options are only used with a base given by name; "
                                 "configure the base Method instance directly")
            self.base = base
        elif isinstance(base, str):
            if base_options is not None and not isinstance(base_options, dict):
                raise TypeError(f"base_options must be a dict of the base method's options, "
                                f"got {type(base_options).__name__}")
            self.base = create_method(base, base_options)
        else:
            raise TypeError(f"base must be a method name or a Method instance, got {type(base).__name__}")
        self.base_options = dict(base_options) if base_options else None
        self.samples = check_steps(samples, "samples")
        if isinstance(noise_level, bool) or not isinstance(noise_level, numbers.Real) \
                or not math.isfinite(noise_level) or noise_level < 0:
            raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
        self.noise_level = float(noise_level)
        if not isinstance(magnitude, bool):
            raise TypeError(f"magnitude must be True or False, got {magnitude!r}")
        self.magnitude = magnitude
        # A single-channel base (Grad-CAM) makes a single-channel smoothed map.
        self.single_channel = self.base.single_channel

    def options(self) -> dict[str, Any]:
        """SmoothGrad's options, with ``base_options`` as the base method's full options."""
        out = super().options()
        out["base_options"] = self.base.options()
        return out

    def layers(self, run: "Run") -> list[nn.Module]:
        return self.base.layers(run) if self.noise_level == 0 else []

    def shares_input_gradient(self) -> bool:
        return self.noise_level == 0 and self.base.shares_input_gradient()

    def guided_input_gradient(self) -> str | None:
        return self.base.guided_input_gradient() if self.noise_level == 0 else None

    def attribute(self, run: "Run") -> Attribution:
        if self.noise_level == 0:
            base = self.base.attribute(run)
            return Attribution(base.map * base.map if self.magnitude else base.map,
                               _warnings_of(base.extras.get("warnings", [])))
        x = run.x
        n, row_shape = x.shape[0], tuple(x.shape[1:])
        flat = x.flatten(1)
        # (N,), the product taken in float64 and rounded once (as Captum and PAIR do with a Python
        # float): a float32 noise level is one rounding more, and on an ill-conditioned 3D U-Net that
        # last bit of every noisy copy moved the map 3.5e-3 from float64 (Captum's: 6.0e-4)
        sigma = (self.noise_level * (flat.amax(dim=1) - flat.amin(dim=1)).double()).to(x.dtype)
        generator = run.generator(self.name)
        total: Tensor | None = None
        warned: list[str] = []
        for chunk in run.row_chunks(self.samples, desc=self.name):
            # Rows are sample-major: row k is copy k % samples of sample k // samples.
            noise = torch.empty((len(chunk), *row_shape))
            for k in range(len(chunk)):
                torch.randn(row_shape, generator=generator, out=noise[k])
            noisy = noise.to(x.device, x.dtype).mul_(sigma[chunk.sample].view(-1, *([1] * len(row_shape))))
            noisy += x[chunk.sample]
            del noise
            result = self.base.attribute(run.at(noisy, chunk.owner))
            del noisy
            maps = result.map * result.map if self.magnitude else result.map
            if total is None:
                total = torch.zeros((n, *maps.shape[1:]), dtype=maps.dtype, device=maps.device)
            chunk.add_per_sample(total, maps)
            warned.extend(result.extras.get("warnings", []))
            del maps, result
        return Attribution(total / self.samples, _warnings_of(warned))


def _warnings_of(lines: list[str]) -> dict[str, list[str]]:
    """The base method's warnings, each once, as SmoothGrad's extras."""
    lines = list(dict.fromkeys(lines))
    return {"warnings": lines} if lines else {}


@register
class SmoothGradIG(SmoothGrad):
    """SmoothGrad over integrated gradients (PAIR ``IntegratedGradients().GetSmoothedMask``).

    The options are SmoothGrad's, with ``base`` defaulting to ``"integrated_gradients"``;
    ``base_options`` sets IG's ``steps``, ``rule`` and ``baseline``.
    """

    name = "smoothgrad_ig"

    def __init__(self, base: str | Method = "integrated_gradients", base_options: dict[str, Any] | None = None,
                 samples: int = 25, noise_level: float = 0.15, magnitude: bool = False):
        super().__init__(base, base_options, samples, noise_level, magnitude)
