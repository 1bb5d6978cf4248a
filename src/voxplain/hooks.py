"""Hooks the engine installs on a model for one pass, and nothing else does.

Two kinds exist:

* :class:`LayerCapture` keeps a layer's output so that its activation and its
  gradient can be read after the backward pass (Grad-CAM).
* :class:`GuidedReLU` changes the backward pass of every ReLU-family module to
  guided backpropagation (Springenberg et al. 2015): the gradient passes only
  where it is positive *and* where the forward input was positive.

Both register *tensor* hooks from module forward hooks rather than module
backward hooks, because module backward hooks break on in-place activations
("a view ... is being modified inplace").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GUIDED_ACTIVATIONS", "GUIDED_SETS", "GUIDABLE", "guided_types", "guided_rule", "LayerCapture",
           "GuidedReLU", "HookSet", "has_guided_activations"]

#: Activation module types whose backward pass guided backpropagation rewrites by default
#: (the ``"relu_family"`` set). All keep the sign of their input, so the forward output's
#: sign is the input's, and all pass little or no signal for negative inputs.
GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.RReLU,
)

#: The activation sets a guided pass can rewrite, by option name: ``"relu_family"``
#: (default) or ``"relu"`` (``nn.ReLU`` only, as Captum's ``GuidedBackprop``).
GUIDED_SETS: dict[str, tuple[type[nn.Module], ...]] = {
    "relu_family": GUIDED_ACTIVATIONS,
    "relu": (nn.ReLU,),
}


def guided_types(guided: bool | str | None) -> tuple[type[nn.Module], ...]:
    """The module types a pass guides: none for ``False``/``None``, the default set for ``True``,
    else the set named ``guided`` (see :data:`GUIDED_SETS`)."""
    if guided is None or guided is False:
        return ()
    if guided is True:
        return GUIDED_ACTIVATIONS
    if isinstance(guided, str) and guided in GUIDED_SETS:
        return GUIDED_SETS[guided]
    raise ValueError(f"guided activations must be one of {', '.join(repr(k) for k in GUIDED_SETS)}, "
                     f"got {guided!r}")


class HookSet:
    """Handles of hooks installed together; :meth:`remove` is idempotent."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


class LayerCapture:
    """Records the output of ``layers`` during a forward pass.

    The recorded tensors are the ones in the autograd graph, so gradients with
    respect to them can be taken. The layer's consumers receive a clone: an
    in-place operation downstream (``ReLU(inplace=True)``) then cannot overwrite
    the recorded activation.

    With ``start_graph`` (the input does not require grad), a layer whose output does not
    yet require grad starts the autograd graph: its output is recorded as a leaf, so the
    forward pass before it records nothing for backward, and the backward pass stops there.
    Layers downstream of it stay in its graph; a layer on a parallel branch starts its own.
    """

    def __init__(self, layers: Iterable[nn.Module], start_graph: bool = False) -> None:
        self.layers = list(layers)
        self.outputs: dict[int, Tensor] = {}
        self.start_graph = start_graph

    def install(self, hooks: HookSet) -> None:
        for i, layer in enumerate(self.layers):
            hooks.add(layer.register_forward_hook(self._make_hook(i)))

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"cannot capture layer {type(module).__name__}: its output is a "
                    f"{type(output).__name__}, not a tensor; choose a layer that returns a tensor"
                )
            if i in self.outputs:
                raise RuntimeError(
                    f"layer {type(module).__name__} ran twice in one forward pass; "
                    "choose a layer that is used once"
                )
            if self.start_graph and not output.requires_grad:
                # no captured layer lies upstream: the graph starts here (a branch of its own)
                output = output.detach().requires_grad_(True)
            self.outputs[i] = output
            return output.clone()

        return hook

    def activations(self) -> list[Tensor]:
        missing = [type(self.layers[i]).__name__ for i in range(len(self.layers)) if i not in self.outputs]
        if missing:
            raise RuntimeError(f"layer(s) {missing} did not run in the forward pass")
        return [self.outputs[i] for i in range(len(self.layers))]


#: Activation modules whose own backward pass already passes gradient only where their
#: output is positive (ReLU, and ReLU6 = Hardtanh(0, 6)): the guided rule there is
#: only to clamp the incoming gradient at zero; no mask of the forward output is needed.
_SELF_MASKING: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def _clamp_gradient(grad: Tensor) -> Tensor:
    return grad.clamp(min=0)


def guided_rule(module: nn.Module, output: Tensor) -> Callable[[Tensor], Tensor]:
    """The tensor hook that makes the gradient at ``output`` of the activation ``module`` guided:
    positive gradient only, and only where the forward output (whose sign is the input's) is positive.

    Read the output's sign when the hook is made, before any later in-place edit of it.
    """
    if isinstance(module, _SELF_MASKING):
        return _clamp_gradient
    positive = output.detach() > 0
    return lambda grad: grad.clamp(min=0) * positive


class GuidedReLU:
    """Rewrites the backward pass of the activation modules of ``types`` for guided backpropagation."""

    def __init__(self, model: nn.Module, types: tuple[type[nn.Module], ...] = GUIDED_ACTIVATIONS) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, types)] if types else []

    def install(self, hooks: HookSet) -> None:
        for m in self.modules:
            hooks.add(m.register_forward_hook(_guided_forward_hook))


def _guided_forward_hook(module: nn.Module, inputs, output: Tensor) -> None:
    if isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(guided_rule(module, output))


#: Every activation type some guided set names.
GUIDABLE: tuple[type[nn.Module], ...] = tuple({t: None for types in GUIDED_SETS.values() for t in types})


def has_guided_activations(model: nn.Module, types: tuple[type[nn.Module], ...] = GUIDED_ACTIVATIONS) -> bool:
    """True if guided backpropagation through ``types`` would change anything in ``model``."""
    return bool(types) and any(isinstance(m, types) for m in model.modules())

