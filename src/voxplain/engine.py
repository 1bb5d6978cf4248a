"""The one place that runs the model and autograd.

:class:`Engine` prepares a user's model for explanation (eval mode, parameters
frozen, moved to the device), evaluates scores and gradients for any number of
input rows in chunks sized to a batch size or a memory budget, installs hooks
for one pass only, and always hands the model back as it came: same training
flags, same ``requires_grad`` flags, same device, no hooks, even if a call raises.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import conv_rows, engine_windows, host_heap
from .conv_rows import OneRowConvolutions
from .hooks import GUIDABLE, GuidedReLU, HookSet, LayerCapture, guided_rule, guided_types, has_guided_activations
from .layout import Layout
from .memory import MemoryBudgetError, available_bytes, format_bytes
from .model_outputs import select_output
from .norm_folding import NormFolding
from .sliding_window import SlidingWindow
from .targets import BoundTarget

__all__ = ["Engine", "Gradients", "RecordedPass", "ModelState", "LayerInfo", "parse_memory", "resolve_device"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
# Activations kept for the backward pass plus their gradients, and autograd's
# temporaries, take a few times the forward outputs' size; measured on conv nets
# (CPU and CUDA) the peak stays below 3x the summed leaf-module outputs.
_BACKWARD_OVERHEAD = 3.0
_SCRIPTED_ACTIVATION_FACTOR = 64
# A row whose input, times this, fits the budget is sized by running the model on it (cheap, exact);
# a larger one is sized on the meta device first (shapes only, no memory), so it is refused before it runs.
_REAL_PROBE_FACTOR = 64
# On a CPU, passes are cut to about this much memory each (a size estimate as the budget's):
# measured on conv nets, larger passes run slower per row (memory traffic), smaller ones no faster.
# Measured on the 2-core reference machine (IG, rows per pass): a 2D CNN at 112^2 (14 MB a row)
# ran 1.4x faster per row in passes of 8-16 rows than of 32; at 224^2 (58 MB) 4 rows beat 16 by
# 1.8x; a 3D U-Net at 64^3 (125 MB) 2 rows beat 4 by 1.4x; at 32^3 (16 MB) 4-32 rows were alike.
_CPU_PASS_BYTES = 256 * 1024**2
# ... and at most this many rows, unless that many hold less than _CPU_SMALL_PASS_BYTES (small rows
# then fill that much: per pass costs dominate there). Measured per row on the same machine: a 2D CNN
# at 112^2 ran 1.3-1.6x faster in passes of 4-8 rows than of 16; a 3D U-Net at 32^3 within 6%.
_CPU_PASS_ROWS = 8
_CPU_SMALL_PASS_BYTES = 32 * 1024**2
# Neither cuts a pass below two rows (where the budget allows two): the shipped demo U-Net (174 MB a
# row) took 301 ms per row alone and 108 ms in pairs.
#: Row-size estimates measured per model: model -> {size setting: {row shape: bytes}}. Weak, so an
#: entry goes with its model; later engines on the same model (each explain() call opens one) reuse
#: them instead of running the model on a row again to size it. Sizes only, never tensors.
_ROW_BYTES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
          "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4, "TB": 1024**4,
          "TIB": 1024**4}


def parse_memory(budget: int | float | str) -> int:
    """Bytes in a memory budget given as a number of bytes or a string like ``"2GB"`` or ``"512 MiB"``."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    elif isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"memory_budget must look like '2GB', '512MB' or a number of bytes, got {budget!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise TypeError(f"memory_budget must be a number of bytes or a string like '2GB', got {budget!r}")
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return int(value)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The device to run on: the one asked for, else the model's own."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available on this machine")
        return dev
    first_buffer = None
    for m in _modules_of(model, stop=_has_parameter):  # the first parameter, else the first buffer
        for t in m._parameters.values():
            if t is not None:
                return t.device
        if first_buffer is None:
            first_buffer = next((b for b in m._buffers.values() if b is not None), None)
    return first_buffer.device if first_buffer is not None else torch.device("cpu")


def _has_parameter(m: nn.Module) -> bool:
    return any(t is not None for t in m._parameters.values())


def _modules_of(model: nn.Module, stop=None) -> list[nn.Module]:
    """``list(model.modules())`` (each module once, in the same order), in one loop: this runs on
    every explain() call, where the recursive generators of ``named_modules`` cost more than the rest.
    With ``stop``, the list ends at the first module for which ``stop(module)`` is true."""
    modules: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # an empty child slot, or a module met before
            continue
        seen.add(id(m))
        modules.append(m)
        if stop is not None and stop(m):
            break
        if m._modules:
            children = list(m._modules.values())
            children.reverse()  # the stack pops them in registration order
            stack.extend(children)
    return modules


class ModelState:
    """A snapshot of what explaining may change on a model, and its restoration.

    Training flags, ``requires_grad`` flags, the device and the memory layout (strides) of
    every parameter, buffer and parameter gradient: :meth:`restore` puts back any that changed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = _modules_of(model)
        self.training = [(m, m.training) for m in modules]
        # one walk over the modules (as parameters() and buffers() would take them: in module
        # order, each tensor once), rather than three: this runs on every explain() call
        params: dict[int, Tensor] = {}
        buffers: dict[int, Tensor] = {}
        for m in modules:
            for p in m._parameters.values():
                if p is not None:
                    params.setdefault(id(p), p)
            for b in m._buffers.values():
                if b is not None:
                    buffers.setdefault(id(b), b)
        self.params = list(params.values())
        self.requires_grad = [p.requires_grad for p in self.params]
        self.tensors = self.params + list(buffers.values())
        self.devices = [t.device for t in self.tensors]
        self.strides = [t.stride() for t in self.tensors]
        self.grad_strides = [(p, p.grad.stride()) for p in self.params if p.grad is not None]

    def restore(self) -> None:
        for m, flag in self.training:
            if m.training != flag:
                m.training = flag
        for p, flag in zip(self.params, self.requires_grad):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        if self.devices != [t.device for t in self.tensors]:
            original = self.devices[0]
            if all(dev == original for dev in self.devices):
                self.model.to(original)
            else:  # a model spread over devices: put each tensor back where it was
                for t, dev in zip(self.tensors, self.devices):
                    t.data = t.data.to(dev)
        self.restore_layout()

    def restore_layout(self) -> None:
        """Lay every parameter, buffer and parameter gradient out again as it came (same strides)."""
        for t, stride in zip(self.tensors, self.strides):
            if t.stride() != stride:
                t.data = _with_strides(t.data, stride)
        for p, stride in self.grad_strides:
            if p.grad is not None and p.grad.stride() != stride:
                p.grad = _with_strides(p.grad, stride)


def _with_strides(t: Tensor, stride: tuple[int, ...]) -> Tensor:
    """A copy of ``t`` laid out with ``stride`` (e.g. back from channels-last to as it came)."""
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


@dataclass
class Gradients:
    """Result of one scored forward/backward over N rows."""

    scores: Tensor  # (N,)
    inputs: Tensor | None  # dF/dx, (N, C, *spatial)
    activations: list[Tensor] = field(default_factory=list)  # captured layer outputs
    layer_gradients: list[Tensor] = field(default_factory=list)  # dF/d(layer output)
    # under sliding windows, instead of the two above: per captured layer, the blended
    # per-window Grad-CAM (N, 1, *spatial) (see voxplain.sliding_window)
    layer_maps: list[Tensor] = field(default_factory=list)

    def first(self, n: int) -> "Gradients":
        """The results of the first ``n`` rows."""
        return Gradients(scores=self.scores[:n], inputs=None if self.inputs is None else self.inputs[:n],
                         activations=[t[:n] for t in self.activations],
                         layer_gradients=[t[:n] for t in self.layer_gradients],
                         layer_maps=[t[:n] for t in self.layer_maps])

    @staticmethod
    def concat(parts: Sequence["Gradients"]) -> "Gradients":
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return Gradients(
            scores=torch.cat([p.scores for p in parts]),
            inputs=None if first.inputs is None else torch.cat([p.inputs for p in parts]),
            activations=[torch.cat(t) for t in zip(*[p.activations for p in parts])],
            layer_gradients=[torch.cat(t) for t in zip(*[p.layer_gradients for p in parts])],
            layer_maps=[torch.cat(t) for t in zip(*[p.layer_maps for p in parts])],
        )


@dataclass
class LayerInfo:
    """A module seen during a traced forward pass, in execution order."""

    name: str
    module: nn.Module
    output_shape: tuple[int, ...] | None  # None when the output is not a tensor


@dataclass
class RecordedPass:
    """A forward pass over rows, kept with its autograd graph for one backward pass.

    :meth:`Engine.record` makes it and :meth:`Engine.backward_recorded` uses it, once.
    It keeps the output of every module it watched (all of them when traced) and, when
    recorded for guided use, every output of the guidable activation modules: the
    guided rule is attached to those at backward time, so one recorded forward serves a
    plain or a guided backward, whichever is asked for first. A layer output or an
    activation changed in place after its module returned it cannot serve (a fresh
    pass is needed). Whoever holds it decides which request it serves; the engine
    keeps no reference.
    """

    leaf: Tensor  # the rows on the device, requiring grad
    output: Tensor
    trace: list[LayerInfo] | None  # None unless recorded with the trace
    # module -> (its output, that output's grad_fn when the module returned it); None if
    # the module ran more than once or returned no tensor
    outputs: dict[nn.Module, tuple[Tensor, object] | None]
    # (module, output, grad_fn) of every call of a guidable activation; None if not recorded for guided use
    activations: list[tuple[nn.Module, Tensor, object]] | None = None
    # False when the graph starts at the first kept layer (no dF/dx can be taken)
    input_gradient: bool = True

    def activation(self, layer: nn.Module) -> Tensor | None:
        """``layer``'s output in this pass, or None if it cannot serve a gradient request.

        An in-place operation on a tensor in the graph gives it a new ``grad_fn``, so an
        output whose ``grad_fn`` is no longer the one it was returned with was changed
        later in the forward pass (e.g. by ``ReLU(inplace=True)``); a fresh pass is needed.
        """
        entry = self.outputs.get(layer)
        if entry is None or not entry[0].requires_grad or entry[0].grad_fn is not entry[1]:
            return None
        return entry[0]

    def guided_activations(self, types: tuple[type[nn.Module], ...]) -> list[tuple[nn.Module, Tensor]] | None:
        """The outputs a guided backward through ``types`` rewrites, or None if this pass cannot serve one."""
        if self.activations is None:
            return None
        chosen = [(m, out, fn) for m, out, fn in self.activations if isinstance(m, types)]
        if any(out.grad_fn is not fn for _, out, fn in chosen):
            return None
        return [(m, out) for m, out, _ in chosen]


class Engine:
    """Runs a model for explanation methods.

    Args:
        model: any differentiable ``nn.Module`` taking a (N, C, *spatial) tensor.
        device: where to compute; default the model's device.
        batch_size: rows per forward/backward pass; overrides ``memory_budget``.
        memory_budget: bytes (or ``"2GB"``) that one pass may use; the rows per
            pass are estimated from the sizes of the model's intermediate outputs.
            A row that alone needs more is refused (:class:`~voxplain.memory.MemoryBudgetError`)
            before it runs; without a budget (2 GB for chunking) such a row runs alone if
            the device has the memory free.
        progress: show progress bars for long loops.
        output_key: for a model returning a tuple, list or dict, the index or key of
            the tensor to explain.
        channels_last: run 2D/3D rows in the channels-last memory layout: ``None`` (default)
            where measured faster for the row shape (see :class:`~voxplain.layout.Layout`),
            ``True`` always, ``False`` never. Maps come back in the input's layout either way.
        sliding_window: apply the model to whole volumes window by window, as MONAI's
            ``sliding_window_inference`` does (:class:`~voxplain.sliding_window.SlidingWindow`);
            every pass then goes through it (:mod:`voxplain.engine_windows`).
        fold_batchnorm: opt in to running, inside :meth:`fold_norms`, eval-mode batch norms folded
            into the convolution before them where nothing watches either
            (:mod:`voxplain.norm_folding`): the same function with fewer kernels, but with its
            weights rounded once more, so maps move by float32 rounding times the model's
            condition. ``False`` (default) runs every module as it is.

    Use it as a context manager (``with Engine(...) as engine:``): entering
    prepares the model, leaving restores it. The engine keeps no passes between
    calls: every call runs the model afresh, except :meth:`backward_recorded`,
    which uses a pass its caller kept (see :class:`RecordedPass`). Every model call
    goes through :meth:`_call_model`. On the CPU, host memory a pass frees is kept for
    the next while an engine is open, and given back when the last one closes
    (:mod:`voxplain.host_heap`).
    """

    def __init__(self, model: nn.Module, device=None, batch_size: int | None = None,
                 memory_budget: int | str | None = None, progress: bool = False, output_key=None,
                 channels_last: bool | None = None, sliding_window: SlidingWindow | None = None,
                 fold_batchnorm: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        # TorchScript modules accept no Python forward hooks: no layer capture, guiding or tracing
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self.device = resolve_device(device, model)
        self.batch_size = batch_size
        self.memory_budget = parse_memory(memory_budget) if memory_budget is not None else DEFAULT_MEMORY_BUDGET
        self.budget_given = memory_budget is not None
        self.output_key = output_key
        self.progress = progress
        if sliding_window is not None and not isinstance(sliding_window, SlidingWindow):
            raise TypeError(f"sliding_window must be a SlidingWindow, got {type(sliding_window).__name__}")
        self.sliding_window = sliding_window
        self._state: ModelState | None = None
        self._row_bytes: dict[tuple[int, ...], int] = {}
        self._window_channels: dict[tuple[int, ...], int] = {}
        # a row of the input per row shape, for layout probes (see _probe)
        self._probe_rows: dict[tuple[int, ...], Tensor] = {}
        self._window_budget_warned = False
        self._depth = 0
        self.layout = Layout(self, channels_last)
        self.folding = NormFolding(model, fold_batchnorm and not self.scripted)
        self._exact = 0  # > 0 while exact_model() is open
        self._folding_depth = 0  # > 0 while fold_norms() is open
        self._one_row_convs: OneRowConvolutions | None = None  # made on the first one-row 3D pass
        self._heap_kept = False  # host memory freed by a pass is kept for the next (host_heap)

    # -- model preparation -------------------------------------------------
    def __enter__(self) -> "Engine":
        if self._depth == 0:
            state = self._state = ModelState(self.model)
            try:
                if any(flag for _, flag in state.training):
                    self.model.eval()
                for p, flag in zip(state.params, state.requires_grad):
                    if flag:
                        p.requires_grad_(False)
                if state.devices.count(self.device) != len(state.devices):
                    self.model.to(self.device)
                self._share_row_bytes(state)
                self.layout.attach()
                self.folding.prepare([m for m, _ in state.training])
            except BaseException:
                state.restore()
                self._state = None
                raise
            self._heap_kept = self.device.type == "cpu" and host_heap.acquire()
        self._depth += 1
        return self

    def _share_row_bytes(self, state: ModelState) -> None:
        """Use the row-size estimates earlier engines measured on this model, as long as nothing they
        depend on changed: the device, the output selected, the parameters' and buffers' shapes and dtypes,
        the module count."""
        setting = (str(self.device), repr(self.output_key), self.scripted, len(state.training),
                   tuple([(t.shape, t.dtype) for t in state.tensors]))
        try:
            shared = _ROW_BYTES.setdefault(self.model, {}).setdefault(setting, {})
        except TypeError:  # a model that cannot be weakly referenced: estimates per engine
            return
        for shape, size in self._row_bytes.items():
            shared.setdefault(shape, size)
        self._row_bytes = shared

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._state is not None:
            try:
                self.layout.forget_model_format()  # the weights as they came, put back without a copy
            finally:
                self._state.restore()
                self._state = None
                if self._heap_kept:
                    self._heap_kept = False
                    host_heap.release()

    @contextlib.contextmanager
    def _hooks(self, layers: Sequence[nn.Module] = (), guided: bool | str = False,
               start_graph: bool = False) -> Iterator[LayerCapture]:
        types = guided_types(guided)
        if self.scripted and (layers or types):
            self._refuse_scripted("guided backpropagation" if types else "capturing a layer")
        hooks = HookSet()
        capture = LayerCapture(layers, start_graph)
        try:
            if types:
                GuidedReLU(self.model, types).install(hooks)
            capture.install(hooks)
            yield capture
        finally:
            hooks.remove()

    def _require_prepared(self) -> None:
        if self._depth == 0:
            raise RuntimeError("use the Engine inside a `with engine:` block")

    def _call_model(self, x: Tensor) -> Tensor:
        """The model on rows ``x`` (already on the device): the one place the model is called.

        Rows go in the memory layout chosen for their shape (:class:`Layout`); the model's
        parameters are laid out to match. Inside :meth:`fold_norms`, batch norms run folded where
        nothing watches them. One 3D row on the CPU runs its convolutions as two
        rows where PyTorch's kernels for one are slow (:mod:`voxplain.conv_rows`). Returns the
        tensor the model returns, or the one :attr:`output_key` selects from its tuple, list or
        dict (:func:`~voxplain.model_outputs.select_output`).
        """
        x = self.layout.arrange(x)
        fold = self._folding_depth and not self._exact
        with self.folding.applied(self.layout.original) if fold else contextlib.nullcontext():
            if self._pads_one_row(x):
                if self._one_row_convs is None:
                    self._one_row_convs = OneRowConvolutions()
                with self._one_row_convs:
                    return select_output(self.model(x), self.output_key)
            return select_output(self.model(x), self.output_key)

    @contextlib.contextmanager
    def fold_norms(self) -> Iterator[None]:
        """While open, passes run with eval-mode batch norms folded into the convolution before them,
        where nothing watches either (:class:`~voxplain.norm_folding.NormFolding`; not inside
        :meth:`exact_model`, and only on an engine made with ``fold_batchnorm=True``).

        The same function to float rounding, not to the bit: the run opens it for the passes at rows
        derived from the input (path points, noisy copies, occluded copies), each of which a method
        computes in its own walk; the passes at the input itself, which methods share, run the model
        as it is, so a map does not depend on which other methods ran."""
        self._folding_depth += 1
        try:
            yield
        finally:
            self._folding_depth -= 1

    @contextlib.contextmanager
    def exact_model(self) -> Iterator[None]:
        """While open, passes run the model exactly as it came: in its own memory layout (no trial runs)
        and with no batch norm folded. For work whose maps depend on the kernels' rounding more than
        on their speed (:class:`~voxplain.methods.blur_ig.BlurIG`, :class:`~voxplain.methods.guided_ig.GuidedIG`)."""
        self._exact += 1
        try:
            with self.layout.in_model_layout():
                yield
        finally:
            self._exact -= 1

    def _remember_row(self, x: Tensor) -> None:
        """Keep a copy of the first row of ``x`` for layout probes of its shape (once per shape); called
        by every entry that walks rows, before its walk may probe. No copy where no trial can run."""
        row_shape = tuple(x.shape[1:])
        if row_shape not in self._probe_rows and self.layout.may_probe(row_shape):
            self._probe_rows[row_shape] = x[:1].detach().to(self.device, copy=True)

    def _pads_one_row(self, x: Tensor) -> bool:
        """Whether a call on ``x`` runs one-row convolutions as two rows: one 3D row on the CPU whose
        pass, with the convolutions' rows doubled, surely fits the memory budget. Not under sliding
        windows: their budget is shared between a window batch and the volume's buffers, and counts
        the window batch once."""
        if (x.shape[0] != 1 or x.ndim != 5 or x.device.type != "cpu" or self.scripted
                or self.sliding_window is not None or not conv_rows.available()):
            return False
        row_shape = tuple(x.shape[1:])
        known = self._row_bytes.get(row_shape)
        return 2 * known <= self.memory_budget if known is not None else not self._is_large_row(row_shape)

    # -- chunking ----------------------------------------------------------
    def rows_per_pass(self, row_shape: Sequence[int], backward: bool = True) -> int:
        """How many rows of shape (C, *spatial) one pass may take.

        Raises :class:`~voxplain.memory.MemoryBudgetError` when a single row needs more
        than the memory budget given (or, with no budget given, more than the device has free).
        """
        if self.batch_size is not None:
            return self.batch_size
        if self.sliding_window is not None:
            return engine_windows.rows_per_pass(self, row_shape, backward)
        per_row = self._estimate_row_bytes(tuple(row_shape))
        if not backward:
            per_row = max(1, int(per_row / _BACKWARD_OVERHEAD))
        rows = int(self.memory_budget // per_row)
        if rows < 1:
            self._check_one_row_fits(tuple(row_shape), per_row, backward)
        return max(1, rows)

    def _check_one_row_fits(self, row_shape: tuple[int, ...], per_row: int, backward: bool) -> None:
        pass_kind = "forward and backward pass" if backward else "forward pass"
        need = (f"one input row of shape {row_shape} needs about {format_bytes(per_row)} for a {pass_kind} "
                "(estimated from the sizes of the model's layer outputs)")
        self.refuse_over_budget(per_row, need, "crop or downsample the input, or use a machine with more memory")

    def refuse_over_budget(self, need_bytes: int, need: str, advice: str) -> None:
        """Raise :class:`~voxplain.memory.MemoryBudgetError` (``need``, then ``advice``) for a pass needing
        ``need_bytes`` when a budget was given (it needs more), or else when the device has less free."""
        if self.budget_given:
            raise MemoryBudgetError(f"{need}, more than memory_budget={format_bytes(self.memory_budget)}; "
                                    f"raise memory_budget (--memory-budget) or {advice}")
        free = available_bytes(self.device)
        if free is not None and need_bytes > free:
            raise MemoryBudgetError(f"{need}, more than the {format_bytes(free)} free on {self.device}; {advice}")

    def _is_large_row(self, row_shape: Sequence[int]) -> bool:
        """Whether running the model on one row just to size it could itself use too much memory."""
        return 4 * math.prod(row_shape) * _REAL_PROBE_FACTOR > self.memory_budget

    def _is_large_pass(self, row_shape: Sequence[int]) -> bool:
        """Whether one row's pass must be sized (and may be refused) before it runs: a large row, or under a
        sliding window a large window batch or padded row (the row itself may be smaller than one window)."""
        if self.sliding_window is not None:
            return engine_windows.is_large_pass(self, row_shape)
        return self._is_large_row(row_shape)

    def rows_per_chunk(self, row_shape: Sequence[int], backward: bool = True) -> int:
        """How many rows of shape (C, *spatial) :meth:`chunks` puts in one pass: :meth:`rows_per_pass`,
        on a CPU at most about 256 MB of estimated working set and 8 rows (or 32 MB of small rows),
        but two rows where the budget allows: larger passes, and one row, run slower per row there."""
        per_pass = self.rows_per_pass(row_shape, backward)
        # under sliding windows a row is a whole volume, never run in one call: its windows are sized apart
        if self.batch_size is None and self.device.type == "cpu" and self.sliding_window is None:
            per_row = self._estimate_row_bytes(tuple(row_shape))
            if not backward:
                per_row = max(1, int(per_row / _BACKWARD_OVERHEAD))
            # the CPU caps (_CPU_PASS_BYTES, _CPU_PASS_ROWS), never below two rows the budget allows
            per_pass = min(per_pass, max(2, min(_CPU_PASS_BYTES // per_row,
                                                max(_CPU_PASS_ROWS, _CPU_SMALL_PASS_BYTES // per_row))))
        return per_pass

    def chunks(self, n_rows: int, row_shape: Sequence[int], backward: bool = True) -> Iterator[slice]:
        """Slices covering ``range(n_rows)`` in pieces that fit one pass.

        The walk runs in one memory layout from its first pass to its last (:meth:`Layout.walk`,
        which may measure the layout first).
        """
        row_shape = tuple(row_shape)
        if n_rows == 1 and (self.batch_size is not None or not self._is_large_pass(row_shape)):
            # nothing to split and nothing to refuse: skip the size estimate (a forward pass of its own)
            with self._walk(1, row_shape, backward, 1):
                yield slice(0, n_rows)
            return
        per_pass = self.rows_per_chunk(row_shape, backward)
        # Equal chunks rather than full ones and a small remainder: a pass of few rows
        # costs nearly as much as a full one on CPU, and smaller passes are often faster per row.
        step = math.ceil(n_rows / math.ceil(n_rows / per_pass))
        slices = [slice(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]
        if self.sliding_window is not None:  # windows run inside each pass: nothing to lay out here
            yield from slices
            return
        with self._walk(step, row_shape, backward, len(slices)):
            yield from slices

    def _walk(self, rows: int, row_shape: tuple[int, ...], backward: bool,
              n_passes: int) -> contextlib.AbstractContextManager[None]:
        """One walk of ``n_passes`` passes of ``rows`` rows (:meth:`Layout.walk`, probing with :meth:`_probe`):
        in one memory layout, and, for gradients, with no pass of one row where the walk's passes hold
        more (see :meth:`_gradient_pass`)."""
        return self.layout.walk(rows, row_shape, backward, n_passes, lambda n: self._probe(n, row_shape, backward))

    def _probe(self, rows: int, row_shape: tuple[int, ...], backward: bool) -> None:
        """One pass of ``rows`` rows of ``row_shape`` whose result is thrown away (a layout trial's
        timing): copies of a row of the explained input where the engine saw one, else zeros; with
        ``backward``, the gradient of the output's sum (any score costs one backward through the model)."""
        seen = self._probe_rows.get(row_shape)
        row = seen if seen is not None else torch.zeros((1, *row_shape), device=self.device)
        x = row.expand(rows, *row_shape).contiguous()
        if not backward:
            with torch.no_grad():
                self._call_model(x)
            return
        with torch.enable_grad():
            x.requires_grad_(True)
            out = self._call_model(x)
            torch.autograd.grad(out.sum(), x, allow_unused=True)

    def has_run_on(self, row_shape: Sequence[int]) -> bool:
        """True if the model has run on rows of ``row_shape`` before (a size estimate for them exists,
        on this engine or an earlier one on the same model: see :meth:`_share_row_bytes`)."""
        return not self.scripted and tuple(row_shape) in self._row_bytes

    def fits_one_pass(self, x: Tensor) -> bool:
        """True if the rows ``x`` fit one forward/backward pass.

        A large row is sized first without running the model on it, so one that does not
        fit at all is refused here (:class:`~voxplain.memory.MemoryBudgetError`).
        """
        row = tuple(x.shape[1:])
        if self.batch_size is None and self._is_large_pass(row):
            self.rows_per_pass(row)
        return x.shape[0] == 1 or x.shape[0] <= self.rows_per_pass(row)

    def _estimate_row_bytes(self, row_shape: tuple[int, ...]) -> int:
        if row_shape not in self._row_bytes and self.scripted:
            # no hooks to measure intermediate outputs: assume a conv net's activations
            # take _SCRIPTED_ACTIVATION_FACTOR times the input
            self._set_row_bytes(row_shape, _SCRIPTED_ACTIVATION_FACTOR * 4 * math.prod(row_shape))
        if row_shape not in self._row_bytes:
            total = None
            if self._is_large_row(row_shape):
                total = self._leaf_output_bytes(row_shape, on_meta=True)
            if total is None:
                total = self._leaf_output_bytes(row_shape, on_meta=False)
            self._set_row_bytes(row_shape, total)
        return self._row_bytes[row_shape]

    def _leaf_output_bytes(self, row_shape: tuple[int, ...], on_meta: bool) -> int | None:
        """Summed output sizes of the leaf modules for one row.

        ``on_meta``: propagate shapes on the meta device (no memory, nothing computed);
        returns None if the model cannot run there (e.g. it reads values).
        """
        from torch.func import functional_call

        with torch.no_grad(), self._counting_leaf_outputs() as counted:
            if on_meta:
                state = {name: torch.empty_like(t, device="meta") for name, t in
                         [*self.model.named_parameters(), *self.model.named_buffers()]}
                try:
                    functional_call(self.model, state, (torch.zeros((1, *row_shape), device="meta"),))
                except Exception:  # noqa: BLE001 - any failure on meta means: measure for real instead
                    return None
            else:
                self._call_model(torch.zeros((1, *row_shape), device=self.device))
        return counted[0]

    @contextlib.contextmanager
    def _counting_leaf_outputs(self) -> Iterator[list[int]]:
        """While open, ``counted[0]`` sums the bytes of every tensor a leaf module returns."""
        counted = [0]

        def count(module, inputs, output):
            if isinstance(output, Tensor):
                counted[0] += output.numel() * output.element_size()

        hooks = HookSet()
        try:
            for m in self.model.modules():
                if next(m.children(), None) is None:
                    hooks.add(m.register_forward_hook(count))
            yield counted
        finally:
            hooks.remove()

    def _set_row_bytes(self, row_shape: tuple[int, ...], leaf_output_bytes: int) -> None:
        input_bytes = 4 * math.prod(row_shape)
        # input, its gradient, the path point and an accumulator, plus activations
        self._row_bytes[row_shape] = int(_BACKWARD_OVERHEAD * leaf_output_bytes + 4 * input_bytes) + 1

    # -- evaluation --------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The model's output on ``x`` (no gradient), chunked.

        One row whose shape has no size estimate yet is sized on the way (the estimate's
        own forward pass is then saved).
        """
        self._require_prepared()
        if self.sliding_window is not None:
            return engine_windows.forward(self, x)
        row_shape = tuple(x.shape[1:])
        if x.shape[0] == 1 and not self.scripted and self.batch_size is None and row_shape not in self._row_bytes:
            with torch.no_grad(), self._counting_leaf_outputs() as counted:
                out = self._call_model(x.to(self.device))
            self._set_row_bytes(row_shape, counted[0])
            return out
        self._remember_row(x)
        outs = []
        with torch.no_grad():
            for sl in self.chunks(x.shape[0], x.shape[1:], backward=False):
                outs.append(self._call_model(x[sl].to(self.device)))
        return torch.cat(outs)

    def scores(self, x: Tensor, target: BoundTarget, sample_index: Tensor) -> Tensor:
        """Target scores (N,) of rows ``x`` (no gradient), chunked."""
        self._require_prepared()
        if self.sliding_window is not None:
            return engine_windows.scores(self, x, target, sample_index)
        self._remember_row(x)
        outs = []
        with torch.no_grad():
            for sl in self.chunks(x.shape[0], x.shape[1:], backward=False):
                out = self._call_model(x[sl].to(self.device))
                outs.append(target.score(out, sample_index[sl].to(self.device)))
        return torch.cat(outs)

    def activations(self, x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
        """The outputs of ``layers`` on rows ``x`` (no gradient, one pass); under sliding windows, on the
        central window of each row."""
        self._require_prepared()
        if self.sliding_window is not None:
            x = self.sliding_window.window(x.to(self.device))
        with torch.no_grad(), self._hooks(layers) as capture:
            self._call_model(x.to(self.device))
            return [a.detach() for a in capture.activations()]

    def gradients(self, x: Tensor, target: BoundTarget, sample_index: Tensor, *,
                  layers: Sequence[nn.Module] = (), guided: bool | str = False,
                  input_gradient: bool = True) -> Gradients:
        """Scores and gradients of the target for every row of ``x``, chunked.

        Args:
            x: rows (N, C, *spatial).
            target: the bound target that scores each row.
            sample_index: (N,) the original sample each row derives from.
            layers: modules whose outputs and output gradients are returned too.
            guided: guided backpropagation through the activation set named (see
                :data:`voxplain.hooks.GUIDED_SETS`; ``True`` is the default set).
            input_gradient: also return dF/dx (False when only layers are needed).

        Under sliding windows the captured layers come back as blended per-window
        Grad-CAMs (``layer_maps``), not as activations and their gradients.
        """
        self._require_prepared()
        if self.sliding_window is not None:
            return engine_windows.gradients(self, x, target, sample_index, layers, guided, input_gradient)
        self._remember_row(x)
        parts = [self._gradient_pass(x[sl], target, sample_index[sl], layers, guided, input_gradient)
                 for sl in self.chunks(x.shape[0], x.shape[1:])]
        return Gradients.concat(parts)

    def record(self, x: Tensor, *, trace: bool = True, layers: Sequence[nn.Module] = (),
               guided: bool = True, input_gradient: bool = True) -> RecordedPass:
        """One forward pass over ``x`` (which must fit one pass), kept with its graph.

        Args:
            x: the rows.
            trace: keep the trace (modules in execution order, with output shapes) and every
                module's output, so any layer can be read after the fact; a traced pass of
                one row also fills in the memory estimate for its row shape. Costs a Python
                hook call per module call.
            layers: without the trace, the modules whose outputs are kept.
            guided: keep the outputs of the guidable activation modules, so that the pass
                can also serve a guided backward.
            input_gradient: without the trace and with ``layers``, False starts the graph at the
                first of them to run (the pass then serves layer gradients only, and costs less).
        """
        self._require_prepared()
        if self.scripted:
            self._refuse_scripted("recording a pass")
        if self.sliding_window is not None:
            raise ValueError("no recorded pass under sliding windows: its graph would span the whole volume")
        outputs: dict[nn.Module, tuple[Tensor, object] | None] = {}
        activations: list[tuple[nn.Module, Tensor, object]] | None = [] if guided else None
        seen: list[LayerInfo] | None = [] if trace else None
        leaf_bytes = 0
        self._remember_row(x)

        start_graph = not input_gradient and not trace and bool(layers)

        def keep(module, inputs, output):
            is_tensor = isinstance(output, Tensor)
            if start_graph and is_tensor and not output.requires_grad and module not in outputs:
                # no kept layer lies upstream: the graph starts here; consumers get a copy
                leaf = output.detach().requires_grad_(True)
                outputs[module] = (leaf, None)
                return leaf.clone()
            outputs[module] = (output, output.grad_fn) if is_tensor and module not in outputs else None

        def keep_activation(module, inputs, output):
            if isinstance(output, Tensor) and output.requires_grad:
                activations.append((module, output, output.grad_fn))

        # the walk of this one pass: a layout trial due here probes before any hook is installed
        with self._walk(x.shape[0], tuple(x.shape[1:]), True, 1):
            hooks = HookSet()
            try:
                if trace:
                    names = {m: n for n, m in self.model.named_modules()}
                    leaves = {m for m in names if next(m.children(), None) is None}

                    def record(module, inputs, output):
                        nonlocal leaf_bytes
                        is_tensor = isinstance(output, Tensor)
                        if is_tensor and module in leaves:
                            leaf_bytes += output.numel() * output.element_size()
                        seen.append(LayerInfo(names.get(module, "?"), module, tuple(output.shape) if is_tensor else None))
                        keep(module, inputs, output)
                        if activations is not None and isinstance(module, GUIDABLE):
                            keep_activation(module, inputs, output)

                    for m in names:
                        if m is not self.model:
                            hooks.add(m.register_forward_hook(record))
                else:
                    for layer in dict.fromkeys(layers):
                        hooks.add(layer.register_forward_hook(keep))
                    if activations is not None:
                        for m in self.model.modules():
                            if isinstance(m, GUIDABLE):
                                hooks.add(m.register_forward_hook(keep_activation))
                leaf = x.detach().to(self.device).requires_grad_(not start_graph)
                with torch.enable_grad():
                    out = self._call_model(leaf)
            finally:
                hooks.remove()
        row_shape = tuple(x.shape[1:])
        if trace and x.shape[0] == 1 and row_shape not in self._row_bytes:  # the size estimate comes free
            self._set_row_bytes(row_shape, leaf_bytes)
        if self.batch_size is None and (trace or self.budget_given or self._is_large_row(row_shape)):
            # refuses a row that does not fit (measured by this very pass when traced); an untraced
            # small row under the default budget skips the estimate's own forward pass
            self.rows_per_pass(row_shape)
        return RecordedPass(leaf, out, seen, outputs, activations, input_gradient=not start_graph)

    def backward_recorded(self, recorded: RecordedPass, target: BoundTarget, sample_index: Tensor, *,
                          layers: Sequence[nn.Module] = (), guided: bool | str = False,
                          input_gradient: bool = True) -> Gradients | None:
        """Like :meth:`gradients` on the rows of ``recorded``, from its kept graph; None when
        ``recorded`` cannot serve the request (a layer's output or a guided activation changed
        in place, or a guided request on a pass not recorded for it): run :meth:`gradients` instead.

        The graph is freed by the backward pass: use a recorded pass once.
        """
        self._require_prepared()
        if (input_gradient or guided) and not recorded.input_gradient:
            return None
        acts = [recorded.activation(layer) for layer in layers]
        if any(a is None for a in acts):
            return None
        types = guided_types(guided)
        guide: list[tuple[nn.Module, Tensor]] = []
        if types:
            guide = recorded.guided_activations(types)
            if guide is None:
                return None
        handles = [out.register_hook(guided_rule(m, out)) for m, out in guide]
        try:
            return self._backward(recorded.leaf, recorded.output, acts, target, sample_index, input_gradient)
        finally:
            for h in handles:
                h.remove()

    def _gradient_pass(self, x: Tensor, target: BoundTarget, sample_index: Tensor,
                       layers: Sequence[nn.Module], guided: bool | str, input_gradient: bool) -> Gradients:
        if x.shape[0] == 1 and self.layout.walk_rows(tuple(x.shape[1:]), True) > 1:
            # The one-row tail of a walk of larger passes runs as two rows (the copy's results are
            # dropped): PyTorch runs other kernels on one row, and on a 3D U-Net at SmoothGrad's noisy
            # points those moved the gradient 6x further from its float64 value than two-row passes.
            grads = self._gradient_pass(torch.cat([x, x]), target, torch.cat([sample_index, sample_index]),
                                        layers, guided, input_gradient)
            return grads.first(1)
        # Without dF/dx, the graph starts at the first captured layer: nothing before it is recorded.
        layers_only = not input_gradient and bool(layers) and not guided
        x = x.detach().to(self.device).requires_grad_(not layers_only)
        if not layers and not guided:  # nothing to hook: the plain pass (path methods) skips the hook set-up
            with torch.enable_grad():
                return self._backward(x, self._call_model(x), [], target, sample_index, input_gradient)
        with torch.enable_grad(), self._hooks(layers, guided, start_graph=layers_only) as capture:
            out = self._call_model(x)
            acts = capture.activations()
            return self._backward(x, out, acts, target, sample_index, input_gradient)

    def _backward(self, x: Tensor, out: Tensor, acts: list[Tensor], target: BoundTarget,
                  sample_index: Tensor, input_gradient: bool) -> Gradients:
        with torch.enable_grad():
            scores = target.score(out, sample_index.to(self.device))
            wrt = ([x] if input_gradient else []) + acts
            if not scores.requires_grad:
                _warn_constant_score()
                grads = [torch.zeros_like(t) for t in wrt]
            else:
                grads = list(torch.autograd.grad(scores.sum(), wrt, allow_unused=True))
                if input_gradient and grads[0] is None:
                    _warn_constant_score()
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        input_grad = self.layout.as_input(grads[0], x) if input_gradient else None
        return Gradients(scores=scores.detach(), inputs=input_grad,
                         activations=[a.detach() for a in acts],
                         layer_gradients=grads[1:] if input_gradient else grads)

    def trace(self, x: Tensor) -> list[LayerInfo]:
        """Modules in the order they run on ``x`` (one row), with their output shapes; under sliding
        windows, on the central window of the first row (what the model sees)."""
        self._require_prepared()
        if self.scripted:
            self._refuse_scripted("tracing its layers")
        if self.sliding_window is not None:
            x = self.sliding_window.window(x[:1].to(self.device))
        names = {m: n for n, m in self.model.named_modules()}
        seen: list[LayerInfo] = []

        def record(module, inputs, output):
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            seen.append(LayerInfo(names.get(module, "?"), module, shape))

        hooks = HookSet()
        try:
            for m in self.model.modules():
                if m is not self.model:
                    hooks.add(m.register_forward_hook(record))
            with torch.no_grad():
                self._call_model(x[:1].to(self.device))
        finally:
            hooks.remove()
        return seen

    def _refuse_scripted(self, what: str) -> None:
        raise ValueError(
            f"{what} needs Python forward hooks, which TorchScript models do not support; with a "
            "TorchScript model use hook-free methods (vanilla_gradient, gradient_x_input, "
            "integrated_gradients, guided_ig, smoothgrad over those, blur_ig, xrai, occlusion), or load "
            "the model as a voxplain checkpoint or module:factory + weights"
        )

    def has_guided_activations(self, guided: bool | str = True) -> bool:
        """True if the model has activation modules that guided backpropagation (of that set) can rewrite."""
        return has_guided_activations(self.model, guided_types(guided))

    def progress_bar(self, total: int, desc: str):
        """A tqdm bar when progress is on, else a silent stand-in with the same ``update``/``close``."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)


def _warn_constant_score() -> None:
    warnings.warn(
        "the explained score does not depend on the input (no gradient path from input to score); "
        "the attribution is all zeros",
        RuntimeWarning,
        stacklevel=4,
    )
