"""What every explanation method is: a small class with options and ``attribute(run)``.

A :class:`Run` is the shared state of one explanation: the prepared engine, the
rows being explained, the bound target and a cache of passes that several
methods can reuse (one plain forward/backward serves vanilla gradient,
gradient x input and Grad-CAM; one guided pass serves guided backprop and
guided Grad-CAM).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..engine import Engine, Gradients
from ..targets import BoundTarget
from .registry import option_names

__all__ = ["Method", "Run"]


@dataclass
class Run:
    """The rows being explained and everything methods share while explaining them.

    Attributes:
        engine: the prepared engine (model in eval mode on its device).
        x: rows to explain, (N, C, *spatial), on the engine's device.
        target: the target bound to the original batch.
        sample_index: (N,) original sample of each row (``arange(B)`` for the batch itself).
        seed: seed for any randomness; each method derives its own stream from it.
        layers: modules captured in the shared plain gradient pass.
    """

    engine: Engine
    x: Tensor
    target: BoundTarget
    sample_index: Tensor
    seed: int = 0
    layers: list[nn.Module] = field(default_factory=list)
    _cache: dict[Any, Gradients] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def input_gradients(self, guided: bool = False) -> Gradients:
        """Gradients at ``x`` (guided or plain), computed once per run and shared.

        The plain pass also captures every layer in :attr:`layers`.
        """
        key = ("guided" if guided else "plain",)
        if key not in self._cache:
            layers = [] if guided else self.layers
            self._cache[key] = self.engine.gradients(self.x, self.target, self.sample_index,
                                                     layers=layers, guided=guided)
        return self._cache[key]

    def cached_gradients(self, guided: bool = False) -> Gradients | None:
        """The shared pass if an earlier method already computed it, else None (computes nothing).

        A method that needs only layer gradients (Grad-CAM) can use it to reuse the
        shared pass when it exists, and otherwise ask the engine for a pass whose
        backward stops at the layer (``input_gradient=False``).
        """
        return self._cache.get(("guided" if guided else "plain",))

    def layer_index(self, layer: nn.Module) -> int:
        """Position of ``layer`` among the captured layers (it must have been declared)."""
        for i, m in enumerate(self.layers):
            if m is layer:
                return i
        raise RuntimeError("layer was not declared by the method's `layers()`")

    def at(self, x: Tensor, sample_index: Tensor | None = None) -> "Run":
        """A run over other rows (e.g. noisy copies) explaining the same target."""
        if sample_index is None:
            sample_index = self.sample_index
        return Run(self.engine, x, self.target, sample_index.to(x.device), self.seed, list(self.layers))

    def generator(self, salt: str) -> torch.Generator:
        """A CPU random generator seeded from the run's seed and ``salt``.

        Drawing on the CPU and moving to the device gives the same numbers on any device.
        """
        g = torch.Generator()
        g.manual_seed((int(self.seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
        return g


class Method:
    """Base class of explanation methods.

    Subclasses set :attr:`name` (the registry name), take their options as
    keyword arguments of ``__init__`` (stored as attributes of the same name),
    and implement :meth:`attribute`. Calling a method runs it alone through
    :func:`voxplain.explain`.
    """

    name: ClassVar[str] = ""
    #: True if the map has one channel (e.g. Grad-CAM) instead of the input's channels.
    single_channel: ClassVar[bool] = False

    def layers(self, engine: Engine, x: Tensor) -> list[nn.Module]:
        """Layers whose activations this method needs from the shared plain pass."""
        return []

    def attribute(self, run: Run) -> Tensor:
        """The attribution map for ``run.x``: (N, C, *spatial), or (N, 1, *spatial) if single-channel."""
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
        """Explain ``model`` at ``x`` with this method alone; see :func:`voxplain.explain` for kwargs."""
        from ..explain import explain

        return explain(model, x, target, methods=[self], **kwargs)[self.name]
