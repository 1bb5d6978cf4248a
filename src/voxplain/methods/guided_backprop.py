"""Guided backpropagation (Springenberg et al. 2015)."""

from __future__ import annotations

import warnings

from torch import Tensor

from ..engine import Engine
from ..hooks import GUIDED_ACTIVATIONS
from .base import Method, Run
from .registry import register

__all__ = ["GuidedBackprop", "warn_if_unguided"]


def warn_if_unguided(engine: Engine) -> None:
    """Warn when the model has no activation module guided backpropagation can rewrite."""
    if not engine.scripted and not engine.has_guided_activations():
        kinds = ", ".join(t.__name__ for t in GUIDED_ACTIVATIONS)
        warnings.warn(
            f"guided backpropagation found no activation module ({kinds}) in {type(engine.model).__name__}; "
            "functional activations (F.relu, torch.relu) cannot be guided, so the result is the plain gradient",
            UserWarning,
            stacklevel=3,
        )


@register
class GuidedBackprop(Method):
    """The gradient with every ReLU-family activation module passing back only positive
    gradient, and only where its forward input was positive.

    Activations are found by module type (``nn.ReLU`` in place or not, ``LeakyReLU``,
    ``PReLU``, ``ELU``, ...; see :data:`voxplain.hooks.GUIDED_ACTIVATIONS`), so
    MONAI blocks, whose activation is named ``"A"``, are handled. Warns if the
    model has none.
    """

    name = "guided_backprop"

    def attribute(self, run: Run) -> Tensor:
        warn_if_unguided(run.engine)
        return run.input_gradients(guided=True).inputs
