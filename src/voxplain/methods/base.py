"""What every explanation method is: a small class with options and ``attribute(run)``.

A method reads everything it needs from the :class:`~voxplain.run.Run` it is given
(the rows, the bound target, the shared passes, the engine's chunking) and returns
an :class:`Attribution`: its map and its extras (completeness, warnings, regions).
Methods never import :mod:`voxplain.explain` or :mod:`voxplain.run`: the run is
handed to them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from .registry import option_names

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["Method", "Attribution"]


@dataclass
class Attribution:
    """A method's result: the map and what else it found.

    Attributes:
        map: (N, C, *spatial), or (N, 1, *spatial) for single-channel methods.
        extras: method-specific results, JSON-friendly where possible; by convention
            ``"completeness"`` (IG-type methods: per-sample ``error``, ``attribution_sum``,
            ``score_difference``) and ``"warnings"`` (human-readable lines).
    """

    map: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """Record ``message`` under ``extras["warnings"]`` and issue it with :func:`warnings.warn`."""
        self.extras.setdefault("warnings", []).append(message)
        warnings.warn(message, category, stacklevel=3)


class Method:
    """Base class of explanation methods.

    Subclasses set :attr:`name` (the registry name), take their options as
    keyword arguments of ``__init__`` (stored as attributes of the same name),
    and implement :meth:`attribute`. Calling a method runs it alone on a model
    and an input (the same setup as :func:`voxplain.explain`).
    """

    name: ClassVar[str] = ""
    #: True if the map has one channel (e.g. Grad-CAM) instead of the input's channels.
    single_channel: ClassVar[bool] = False

    def layers(self, run: "Run") -> list[nn.Module]:
        """Layers whose outputs and gradients this method reads at ``run.x`` (captured in the shared pass)."""
        return []

    def shares_input_gradient(self) -> bool:
        """True if the method reads the plain dF/dx at ``run.x`` (the shared plain pass)."""
        return False

    def guided_input_gradient(self) -> str | None:
        """The activation set (see :data:`voxplain.hooks.GUIDED_SETS`) of the guided dF/dx at ``run.x``
        this method reads (the shared guided pass), or None."""
        return None

    def attribute(self, run: "Run") -> Attribution:
        """The attribution of ``run.x``: the map and the method's extras."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, as given or defaulted (JSON-friendly where possible)."""
        out = {}
        for key in option_names(type(self)):
            value = getattr(self, key, None)
            if isinstance(value, Method):
                value = value.name
            elif isinstance(value, Tensor):
                value = f"tensor{tuple(value.shape)}"
            elif isinstance(value, nn.Module):
                value = type(value).__name__
            out[key] = value
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def __call__(self, model: nn.Module, x: Tensor, target=None, **kwargs) -> Tensor:
        """Explain ``model`` at ``x`` with this method alone; ``kwargs`` as :func:`voxplain.run.open_run`
        (device, batch_size, memory_budget, progress, seed). Returns the CPU float32 map."""
        from ..run import open_run  # the entry point's setup; methods otherwise only receive runs

        with open_run(model, x, target, methods=[self], **kwargs) as run:
            return run.explain([self]).maps[self.name]
