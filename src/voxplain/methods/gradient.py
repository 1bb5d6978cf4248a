"""Plain gradient methods: the gradient itself and gradient x input."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Attribution, Method
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["VanillaGradient", "GradientXInput"]


@register
class VanillaGradient(Method):
    """dF/dx at the input, signed (Simonyan et al. 2014)."""

    name = "vanilla_gradient"

    def shares_input_gradient(self) -> bool:
        return True

    def attribute(self, run: "Run") -> Attribution:
        return Attribution(run.input_gradients())


@register
class GradientXInput(Method):
    """dF/dx multiplied element-wise by x (Shrikumar et al. 2016)."""

    name = "gradient_x_input"

    def shares_input_gradient(self) -> bool:
        return True

    def attribute(self, run: "Run") -> Attribution:
        return Attribution(run.input_gradients() * run.x)
