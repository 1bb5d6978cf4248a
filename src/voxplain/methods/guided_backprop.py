"""Guided backpropagation (Springenberg et al. 2015), and what it leaves unguided."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from torch import nn

from ..hooks import GUIDED_SETS, guided_types
from .base import Attribution, Method
from .registry import register

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["GuidedBackprop", "check_activations", "unguided_nonlinearities", "warn_unguided",
           "NONLINEARITIES"]

#: Element-wise nonlinear activation modules. Those outside the guided set pass their
#: plain gradient back in a guided pass (GELU/SiLU/Mish even pass negative gradient for
#: negative inputs): UNETR and SwinUNETR use GELU, many recent nets SiLU or Mish.
NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.RReLU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
    nn.GLU,
)


def check_activations(activations: str) -> str:
    """Validate the ``activations`` option of the guided methods."""
    if not isinstance(activations, str) or activations not in GUIDED_SETS:
        raise ValueError(f"activations must be one of {', '.join(repr(k) for k in GUIDED_SETS)}, "
                         f"got {activations!r}")
    return activations


def unguided_nonlinearities(model: nn.Module, activations: str = "relu_family") -> dict[str, int]:
    """Nonlinear activation modules of ``model`` a guided pass over ``activations`` leaves alone: {type: count}."""
    guided = guided_types(activations)
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, NONLINEARITIES) and not isinstance(m, guided):
            counts[type(m).__name__] += 1
    return dict(counts)


def warn_unguided(result: Attribution, run: "Run", activations: str, method: str) -> None:
    """Warn (and record in ``result``) what guided backpropagation cannot guide in ``run``'s model."""
    if run.engine.scripted:
        return
    model = run.model
    types = guided_types(activations)
    names = ", ".join(t.__name__ for t in types)
    unguided = unguided_nonlinearities(model, activations)
    listed = ", ".join(f"{n} x{c}" for n, c in sorted(unguided.items()))
    if not run.engine.has_guided_activations(activations):
        result.warn(f"{method}: found no activation module to guide ({names}) in {type(model).__name__}"
                    + (f"; it has {listed}, left unguided" if unguided else "")
                    + "; functional activations (F.relu, torch.relu) cannot be seen, "
                    "so the result is the plain gradient")
    elif unguided:
        result.warn(f"{method}: guides {names} modules; left unguided (their plain gradient passes back): "
                    f"{listed}; functional activations (F.relu, F.gelu, ...) cannot be seen either")


@register
class GuidedBackprop(Method):
    """The gradient with every guided activation module passing back only positive
    gradient, and only where its forward input was positive.

    Args:
        activations: which activation modules are guided: ``"relu_family"`` (default:
            ``nn.ReLU`` in place or not, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``ELU``,
            ``CELU``, ``SELU``, ``RReLU``, see :data:`voxplain.hooks.GUIDED_ACTIVATIONS`) or
            ``"relu"`` (``nn.ReLU`` only, as Captum's ``GuidedBackprop``).

    Activations are found by module type, so MONAI blocks, whose activation is named
    ``"A"``, are handled. Warns (and lists under ``extras["warnings"]``) the nonlinear
    activation modules it leaves unguided (GELU, SiLU, Mish, ...), and when the model
    has nothing it can guide (e.g. only functional ``F.relu``, which no hook can see).
    """

    name = "guided_backprop"

    def __init__(self, activations: str = "relu_family") -> None:
        self.activations = check_activations(activations)

    def guided_input_gradient(self) -> str | None:
        return self.activations

    def attribute(self, run: "Run") -> Attribution:
        result = Attribution(run.input_gradients(guided=self.activations))
        warn_unguided(result, run, self.activations, self.name)
        return result
