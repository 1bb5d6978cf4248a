"""Plain gradient methods: the gradient itself and gradient x input."""

from __future__ import annotations

from torch import Tensor

from .base import Method, Run
from .registry import register

__all__ = ["VanillaGradient", "GradientXInput"]


@register
class VanillaGradient(Method):
    """dF/dx at the input, signed (Simonyan et al. 2014)."""

    name = "vanilla_gradient"

    def attribute(self, run: Run) -> Tensor:
        return run.input_gradients().inputs


@register
class GradientXInput(Method):
    """dF/dx multiplied element-wise by x (Shrikumar et al. 2016)."""

    name = "gradient_x_input"

    def attribute(self, run: Run) -> Tensor:
        return run.input_gradients().inputs * run.x
