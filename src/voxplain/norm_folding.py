"""Batch norms in eval mode folded into the convolution before them (opt-in), for passes that read neither.

In eval mode a batch norm is a fixed affine map per channel, ``y = s * (z - mean) + beta``
with ``s = gamma / sqrt(var + eps)``. After a convolution ``z = W * x + b`` it is the same
function as one convolution with weights ``s * W`` and bias ``s * (b - mean) + beta``.
Folded, a pass runs one kernel instead of two forward and two backward: measured on the
benchmark's 2D CNN (five conv-BN-ReLU-maxpool blocks) on this project's 2-core machine,
a forward and backward pass took 1.24x less time on one 112^2 row and 1.3x less on eight.
Deployment tools (TorchScript's ``freeze``, ONNX Runtime, TensorRT) make the same rewrite.

The function the model computes is the same; only the rounding moves: the folded weights are
computed in float64 and rounded once, a fixed perturbation of the model of float32's rounding,
which a map then shows times the model's condition (~1e-7 relative on the benchmark's 2D CNN;
on an untrained 3D U-Net with random BatchNorm statistics, integrated gradients moved to 7.5e-4
from their float64 value against 1.1e-4 as the model came). So engines fold only when asked
(``Engine(fold_batchnorm=True)``, ``explain(..., fold_batchnorm=True)``).

What is no longer computed is the convolution's own output. So a pair is folded in a pass only where nothing
can see that output or the batch norm's input: no hook on the convolution, the batch norm,
or a container between them (this also leaves out every pass that captures one of them as
a layer, and traced passes, which hook every module), and no global module hooks.

Only structure that fixes where the convolution's output goes is folded: a convolution that
is a child of a plain ``nn.Sequential`` (its class's own ``forward``) whose next child is the
batch norm, or a plain ``nn.Sequential`` that starts with it (MONAI's ``Convolution`` and
``ADN`` blocks). The model's modules are not changed: during a pass the ``nn.Sequential``
runs its convolution with the folded weights, and the batch norm passes through exactly the
tensor that folded convolution just produced (any other input it normalises as usual).

The pairs and their folded weights are kept with the model (weakly: they go with it), one copy
of each folded convolution weight per memory layout the passes use, and are made again only
when a weight or statistic they come from changes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NormFolding", "foldable_pairs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Pair:
    """One convolution and the batch norm its output goes to, as found in a plain ``nn.Sequential``."""

    def __init__(self, sequential: nn.Sequential, index: int, conv: nn.Module, norm: _BatchNorm,
                 between: list[nn.Module]) -> None:
        self.sequential, self.index, self.conv, self.norm = sequential, index, conv, norm
        self.between = between  # containers that start with the norm, between it and the sequential
        self.watched = [conv, norm, *between]  # modules whose hooks would see the convolution's output
        self.pending: Tensor | None = None  # the folded output the norm is to pass through
        # folded weights per layout of the convolution's weight (at most two: as it came, channels-last)
        self._folded: dict[tuple, tuple[tuple, tuple[Tensor, Tensor]]] = {}
        self.current: tuple[Tensor, Tensor] | None = None  # this pass's folded weight and bias

    def usable(self) -> bool:
        """Whether the pair can be folded in this pass: nothing watches it and the norm is in eval mode
        with its running statistics."""
        norm = self.norm
        return (not norm.training and norm.running_mean is not None and norm.running_var is not None
                and not any(_has_hooks(m) for m in self.watched))

    def prepare(self, original: Callable[[Tensor], Tensor]) -> None:
        """Make the folded weight and bias for the convolution's weight as it is now laid out, for this
        pass's :meth:`convolve`. ``original(t)`` is tensor ``t`` as the model came (the engine may have
        laid a weight out otherwise for the pass): the folded weights are made again only when a tensor
        they come from changed (in place, or replaced) or the eps did, not per engine."""
        w = self.conv.weight
        layout = (w.stride(), w.dtype, w.device)
        sources = (w, self.conv.bias, self.norm.weight, self.norm.bias, self.norm.running_mean,
                   self.norm.running_var)
        state = (self.norm.eps, self.norm.affine,
                 tuple((original(t).data_ptr(), t._version) if t is not None else None for t in sources))
        cached = self._folded.get(layout)
        if cached is None or cached[0] != state:
            if cached is None and len(self._folded) >= 2:
                self._folded.clear()
            self._folded[layout] = (state, _fold(self.conv, self.norm))
        self.current = self._folded[layout][1]

    def convolve(self, x: Tensor) -> Tensor:
        """The convolution followed by the norm, as one convolution (weights from :meth:`prepare`)."""
        weight, bias = self.current
        conv = self.conv
        if isinstance(conv, _CONVS):
            return conv._conv_forward(x, weight, bias)
        n_spatial = weight.ndim - 2
        output_padding = conv._output_padding(x, None, conv.stride, conv.padding, conv.kernel_size,
                                              n_spatial, conv.dilation)
        return _TRANSPOSED[type(conv)](x, weight, bias, conv.stride, conv.padding, output_padding, conv.groups,
                                       conv.dilation)


def _fold(conv: nn.Module, norm: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``conv``'s weight and bias with ``norm`` (eval mode) folded in: computed in float64, rounded once to
    the weight's dtype, in the weight's memory layout and on its device."""
    w = conv.weight.detach()
    # float64 where the device has it (Apple's MPS has not: there, on the CPU)
    work = torch.device("cpu") if w.device.type == "mps" else w.device

    def f64(t: Tensor) -> Tensor:
        return t.detach().to(work, torch.float64)

    var = f64(norm.running_var)
    scale = (f64(norm.weight) if norm.affine else torch.ones_like(var)) / torch.sqrt(var + norm.eps)
    shift = f64(norm.bias) if norm.affine else torch.zeros_like(var)
    bias = f64(conv.bias) if conv.bias is not None else torch.zeros_like(var)
    out_dim = 1 if type(conv) in _TRANSPOSED else 0  # transposed weights are (in, out, *kernel)
    shape = [1] * w.ndim
    shape[out_dim] = -1
    weight = (f64(w) * scale.view(shape)).to(w.device, w.dtype)  # .to keeps the weight's memory layout
    folded_bias = ((bias - f64(norm.running_mean)) * scale + shift).to(w.device, w.dtype)
    return weight, folded_bias


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or getattr(m, "_forward_hooks_with_kwargs", None))


def _global_hooks() -> bool:
    return any(getattr(_module_globals, name, None) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks"))


def _plain_sequential(m: nn.Module) -> bool:
    """A ``nn.Sequential`` whose forward is nn.Sequential's own (each child's output goes to the next only)."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and "forward" not in m.__dict__)


def _foldable_conv(m: nn.Module) -> bool:
    if type(m) in _CONVS:
        return True
    return type(m) in _TRANSPOSED and m.groups == 1 and m.padding_mode == "zeros"


def _foldable_norm(m: nn.Module, channels: int) -> bool:
    return (type(m) in _BATCH_NORMS and "forward" not in m.__dict__ and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None and m.num_features == channels)


def _first_norm(m: nn.Module, channels: int) -> tuple[_BatchNorm, list[nn.Module]] | None:
    """``m`` if it is a foldable norm, or the norm that plain ``nn.Sequential`` containers starting with
    ``m`` run first, with those containers; else None."""
    between = []
    while _plain_sequential(m) and len(m) > 0:
        between.append(m)
        m = m[0]
    return (m, between) if _foldable_norm(m, channels) else None


def foldable_pairs(model: nn.Module) -> list[_Pair]:
    """Every convolution in ``model`` followed by a batch norm it can be folded with (see the module's notes)."""
    counts: dict[int, int] = {}
    for m in model.modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs = []
    for seq in model.modules():
        if not _plain_sequential(seq) or counts[id(seq)] > 1:
            continue
        children = list(seq)
        for i, (conv, after) in enumerate(zip(children, children[1:])):
            if not _foldable_conv(conv) or "forward" in conv.__dict__:
                continue
            found = _first_norm(after, conv.out_channels)
            if found is None:
                continue
            norm, between = found
            if counts[id(conv)] > 1 or counts[id(norm)] > 1 or any(counts[id(b)] > 1 for b in between):
                continue  # a module used in two places may meet other inputs
            if conv.weight.dtype != norm.running_var.dtype or not conv.weight.is_floating_point():
                continue
            pairs.append(_Pair(seq, i, conv, norm, between))
    return pairs


#: Pairs found per model, with the module structure they were found in: model -> (structure, pairs).
#: Weak, so an entry goes with its model; the pairs keep their folded weights between engines.
_PAIRS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[_Pair]]]" = weakref.WeakKeyDictionary()


class NormFolding:
    """The foldable pairs of one model and, per pass, their folding.

    Args:
        model: the model, prepared (eval mode) by the engine that owns this object.
        enabled: False folds nothing.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self._pairs: list[_Pair] | None = None

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Find the pairs among ``modules`` (the model's, each once, in order: the engine's entry), or take
        the ones found before on this model if its module structure is the same."""
        if not self.enabled:
            self._pairs = []
            return
        # the modules, and their child slots (a module also placed in a second slot adds one)
        structure = (tuple(map(id, modules)), sum(len(m._modules) for m in modules))
        try:
            known = _PAIRS.get(self.model)
        except TypeError:  # a model that cannot be weakly referenced
            self._pairs = foldable_pairs(self.model)
            return
        if known is None or known[0] != structure:
            known = _PAIRS[self.model] = (structure, foldable_pairs(self.model))
        self._pairs = known[1]

    def pairs(self) -> list[_Pair]:
        """The model's foldable pairs (none before :meth:`prepare`, or when not enabled)."""
        return self._pairs or []

    @contextlib.contextmanager
    def applied(self, original: Callable[[Tensor], Tensor] = lambda t: t) -> Iterator[None]:
        """While open, model calls run with every pair folded that nothing watches in this pass.

        ``original(t)``: tensor ``t`` as the model came, where the engine laid it out otherwise for
        the pass (see :meth:`_Pair.prepare`)."""
        pairs = self.pairs()
        usable = [p for p in pairs if p.usable()] if pairs and not _global_hooks() else []
        if not usable or torch._C._get_tracing_state():
            yield
            return
        for p in usable:
            p.prepare(original)
        by_sequential: dict[int, list[_Pair]] = {}
        for p in usable:
            by_sequential.setdefault(id(p.sequential), []).append(p)
        patched: list[nn.Module] = []
        try:
            for group in by_sequential.values():
                seq = group[0].sequential
                seq.forward = _folded_sequential(list(seq), {p.index: p for p in group})
                patched.append(seq)
            for p in usable:
                p.norm.forward = _passing_folded(p)
                patched.append(p.norm)
            yield
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)
            for p in usable:
                p.pending = p.current = None


def _folded_sequential(children: list[nn.Module], folded: dict[int, _Pair]):
    """nn.Sequential's forward over ``children``, with the convolutions at ``folded``'s indices folded."""

    def forward(x):
        for i, module in enumerate(children):
            pair = folded.get(i)
            if pair is None:
                x = module(x)
            else:
                x = pair.pending = pair.convolve(x)
        return x

    return forward


def _passing_folded(pair: _Pair):
    """The norm's forward: the folded convolution's output passes through (it is normalised already),
    any other input is normalised as usual."""
    norm = pair.norm

    def forward(x):
        if x is pair.pending:
            pair.pending = None
            return x
        return type(norm).forward(norm, x)

    return forward
