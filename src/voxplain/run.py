"""One explanation in progress: the checked input, the engine, the first forward, the bound target,
and the one cache of passes the methods share.

Every entry point (``explain``, ``Method.__call__``, ``gradcam_per_layer``, the
evaluation metrics, the report pipeline) starts the same way, through
:func:`open_run`: check the input, prepare the model (:class:`~voxplain.engine.Engine`),
run the first forward pass, bind the target to its output. The :class:`Run` it
yields is what methods work on (``method.attribute(run)``) and the only owner of
passes kept between method calls:

* the recorded first pass, with its autograd graph: the first gradient request at
  exactly the run's rows uses it instead of running the model again; any other
  pass drops it, so its memory is not held while, say, IG runs;
* the plain and guided gradient passes at the run's rows (one plain pass serves
  vanilla gradient, gradient x input and Grad-CAM; one guided pass serves guided
  backprop and guided Grad-CAM);
* the layer trace and the layers resolved from it (Grad-CAM layers).

Opted in (``fold_batchnorm``), passes at rows derived from the input (path points, noisy or
occluded copies: each method's own) run with batch norms folded
(:meth:`~voxplain.engine.Engine.fold_norms`); the shared passes at the input always run the
model as it is.

What the shared plain pass holds is declared before any method runs
(:meth:`Run.share`), so the cost and the results do not depend on the order the
methods run in.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import Engine, Gradients, LayerInfo, RecordedPass
from .hooks import guided_types
from .interrupt import raise_if_stop_requested
from .memory import MemoryBudgetError
from .methods.base import Attribution, Method
from .model_outputs import ModelOutputError
from .sliding_window import SlidingWindow, as_sliding_window
from .targets import BoundTarget, Target, as_target

__all__ = ["open_run", "Run", "RowChunk", "Explanation", "check_input", "as_batch_tensor", "seeded_generator"]


def as_batch_tensor(x, name: str = "input") -> Tensor:
    """``x`` (a tensor or numpy array) as a tensor of shape (B, C, *spatial) with 1 to 3 spatial
    dimensions, or a clear error naming ``name``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (B, C, *spatial), "
                        f"got {type(x).__name__}")
    if not 3 <= x.ndim <= 5:
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with 1 to 3 spatial dimensions (3 to 5 dims in all), "
            f"got {x.ndim} dim(s) with shape {tuple(x.shape)}; add the batch/channel axes with "
            "x[None] or x[None, None]"
        )
    return x


def check_input(x) -> Tensor:
    """Return ``x`` as a float32 tensor of shape (B, C, *spatial), or raise a clear error."""
    x = as_batch_tensor(x, "input")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
    if x.numel() == 0:
        raise ValueError(f"input is empty: shape {tuple(x.shape)}")
    # One reduction finds NaN/Inf (they propagate through a sum); only then, or on an
    # overflowing sum of finite values, is the element-wise check run.
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(
            f"input contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite value(s); "
            "explanations need finite inputs"
        )
    x = x.detach()
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def seeded_generator(seed: int, salt: str) -> torch.Generator:
    """A CPU random generator seeded from ``seed`` and ``salt`` (e.g. a method's name).

    Drawing on the CPU and moving to the device gives the same numbers on any device.
    """
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
    return g


@dataclass
class Explanation:
    """Maps and the facts about how they were made.

    ``extras[method]`` is a dict for every method (empty if it has nothing to add):
    e.g. ``"completeness"`` for IG-type methods, ``"warnings"`` (one line each),
    XRAI's ``"ranks"``, ``"gains"`` and ``"base"``.
    """

    maps: dict[str, Tensor]
    seconds: dict[str, float]
    options: dict[str, dict[str, Any]]
    output: Tensor  # model output on the input, CPU
    target: dict[str, Any]  # description of the bound target
    scores: Tensor  # explained score per sample, CPU
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RowChunk:
    """A piece, small enough for one pass, of ``n_samples x per_sample`` rows in sample-major order.

    Row ``k`` of the whole is step ``k % per_sample`` of sample ``k // per_sample``;
    a chunk is rows ``start .. stop - 1``, which may cover parts of several samples.

    Attributes:
        sample: (n,) the sample (row of ``run.x``) of each row of the chunk.
        step: (n,) each row's position within its sample.
        owner: (n,) each row's original sample (``run.sample_index[sample]``), for the target.
        runs: ``(sample, first step, end step)`` of each sample's contiguous rows in the chunk.
    """

    start: int
    stop: int
    sample: Tensor
    step: Tensor
    owner: Tensor
    runs: list[tuple[int, int, int]]

    def __len__(self) -> int:
        return self.stop - self.start

    def add_per_sample(self, total: Tensor, values: Tensor, weights: Tensor | None = None) -> None:
        """``total[r] += `` the sum of ``values`` over sample ``r``'s rows of the chunk.

        With ``weights`` (one per step), the weighted sum ``weights[steps] @ values``, as one
        matrix-vector product. Deterministic: no scatter-add.
        """
        offset = 0
        for r, lo, hi in self.runs:
            part = values[offset:offset + hi - lo]
            if weights is None:
                total[r] += part.sum(dim=0)
            else:
                total[r] += (weights[lo:hi] @ part.flatten(1)).view(total.shape[1:])
            offset += hi - lo


class _BindOnFirstOutput(BoundTarget):
    """A target whose binding reads only the output's shape (:attr:`Target.binds_from_shape`), bound from
    the first output it scores: a run of methods that take no gradient at the input itself (IG, SmoothGrad)
    then needs no forward pass of its own at the input. Asked what it explains before any pass, it binds
    to the model's output at the input (``output_at_x``, one forward)."""

    def __init__(self, target: Target, batch: int, output_at_x: Callable[[], Tensor]) -> None:
        self.target, self.batch, self.output_at_x = target, batch, output_at_x
        self.bound: BoundTarget | None = None

    def bind_to(self, output: Tensor) -> BoundTarget:
        if self.bound is None:
            # rows of the input's batch size with the output's shape: all that binding reads
            self.bound = self.target.bind(output.detach()[:1].expand(self.batch, *output.shape[1:]))
        return self.bound

    def _bound(self) -> BoundTarget:
        return self.bound if self.bound is not None else self.bind_to(self.output_at_x())

    def score(self, output: Tensor, sample_index: Tensor) -> Tensor:
        return self.bind_to(output).score(output, sample_index)

    @property
    def classes(self) -> Tensor:  # type: ignore[override]
        return self._bound().classes

    def describe(self) -> dict:
        return self._bound().describe()

    @property
    def affine_in_output(self) -> bool:
        return self._bound().affine_in_output

    def __getattr__(self, name: str):
        if name in ("target", "batch", "output_at_x", "bound"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self._bound(), name)


class _InputState:
    """What one input gives every target explained on it: the first forward (its output, and the pass
    kept for the first gradient request), its trace, resolved layers."""

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.first: RecordedPass | None = None
        self.trace: list[LayerInfo] | None = None
        self.layers: dict[Any, nn.Module] = {}


class Run:
    """The rows being explained, their bound target, and the passes methods share.

    Use :func:`open_run` to make one; construct it directly only on an engine that is
    already prepared (``with engine:``), for rows ``x`` on its device.

    Attributes:
        engine: the prepared engine (model in eval mode on its device).
        x: rows to explain, (N, C, *spatial), on the engine's device.
        target: the target bound to the original batch (bound from the first forward's output).
        sample_index: (N,) original sample of each row (``arange(B)`` for the batch itself).
        seed: seed for any randomness; each method derives its own stream from it.
        output: the model's output at ``x`` (detached), or None for rows derived from
            the explained input (see :meth:`at`).

    The first forward runs when the run starts (:func:`open_run`), or earlier when
    :meth:`share` needs the trace; what it keeps depends on what was declared (:meth:`share`).
    """

    def __init__(self, engine: Engine, x: Tensor, target: BoundTarget | Target | Callable | None,
                 sample_index: Tensor | None = None, seed: int = 0, *, _input: _InputState | None = None,
                 _parent: "Run | None" = None, defer_forward: bool = False) -> None:
        self.engine = engine
        self.x = x
        self._target = target if isinstance(target, BoundTarget) else None
        self._unbound = None if isinstance(target, BoundTarget) else target
        self.sample_index = (torch.arange(x.shape[0], device=x.device) if sample_index is None
                             else sample_index.to(x.device))
        self.seed = seed
        self.parent = _parent
        self._input = _input if _input is not None else _InputState()
        self._passes: dict[Any, Gradients] = {}
        self._scores_x: Tensor | None = None  # F at x, from the backward of the first forward's own output
        self._declared = False
        self._shared_layers: list[nn.Module] = []
        self._shared_input_gradient = False
        self._shared_guided: set[str] = set()
        # no forward at x of its own where the declared methods need none and the target binds
        # without it (see start)
        self._defer_forward = defer_forward

    # -- what it is ------------------------------------------------------------
    @property
    def output(self) -> Tensor | None:
        """The model's output at ``x`` (detached), from the first forward; None for derived rows."""
        if self.derived:
            return None
        self.start()
        if self._input.output is None:  # deferred (see start): one forward now
            self._input.output = _first_forward(self.engine, self.x, False)[0]
        return self._input.output

    @property
    def target(self) -> BoundTarget:
        """The target, bound to the model's output at the explained input."""
        if self._target is None:
            self.start()
        return self._target

    def start(self, trace: bool = False) -> None:
        """Run the first forward now (if it has not run), and bind the target to its output.

        It keeps, for the first gradient request, its graph and what the methods declared so
        far need (:meth:`share`): the declared layers' outputs, the activations a guided
        pass needs when only guided passes were declared; the trace with ``trace`` or when
        nothing was declared. On a run opened with ``defer_forward`` whose declared methods take
        nothing from it (path methods), it waits (see :meth:`_can_defer_forward`): the target then
        binds to the first output scored, and the output at x is computed only if asked for.
        """
        if self.derived:
            return
        state = self._input
        if state.output is None:
            everything = not self._declared
            # declared methods that take no gradient at x (path methods) need only the output
            keep = everything or trace or bool(self._shared_input_gradient or self._shared_layers or self._shared_guided)
            if not keep and self._can_defer_forward():
                if self._target is None:
                    self._target = _BindOnFirstOutput(self._unbound, int(self.x.shape[0]), lambda: self.output)
                return
            state.output, state.first = _first_forward(
                self.engine, self.x, keep, trace=trace or everything, layers=self._shared_layers,
                guided=everything or (bool(self._shared_guided) and not self._shared_input_gradient),
                input_gradient=everything or bool(self._shared_input_gradient or self._shared_guided))
            if state.first is not None and state.first.trace is not None:
                state.trace = state.first.trace
        if self._target is None:
            self._target = _bind(self._unbound, state.output)

    def _can_defer_forward(self) -> bool:
        """Whether the forward at x can wait until something asks for the output: asked for (explain()
        gives maps only), a target that binds from the output's shape, no sliding window, and a model
        already seen running on rows of this shape (so a model that cannot run on the input still
        fails in the first forward, with its clear message)."""
        return (self._defer_forward and isinstance(self._unbound, Target) and self._unbound.binds_from_shape
                and self.engine.sliding_window is None and self.engine.has_run_on(tuple(self.x.shape[1:])))

    @property
    def device(self) -> torch.device:
        """The engine's device."""
        return self.engine.device

    @property
    def model(self) -> nn.Module:
        """The (prepared) model."""
        return self.engine.model

    @property
    def sliding_window(self) -> SlidingWindow | None:
        """How the model is applied to the whole volume, window by window (None: in one call)."""
        return self.engine.sliding_window

    @property
    def trace_rows(self) -> Tensor:
        """The rows the model's layers are traced on: ``x``, or under sliding windows the central
        window of its first row (layer shapes, the default Grad-CAM layer)."""
        if self.sliding_window is None:
            return self.x
        return self.sliding_window.window(self.x[:1])

    @property
    def n_samples(self) -> int:
        """Number of original samples (the explained batch), also for derived rows."""
        root = self
        while root.parent is not None:
            root = root.parent
        return int(root.x.shape[0])

    @property
    def derived(self) -> bool:
        """True for rows derived from the explained input (e.g. SmoothGrad's noisy copies)."""
        return self.parent is not None

    def generator(self, salt: str) -> torch.Generator:
        """A CPU random generator seeded from the run's seed and ``salt`` (see :func:`seeded_generator`)."""
        return seeded_generator(self.seed, salt)

    # -- related runs ------------------------------------------------------------
    def at(self, x: Tensor, sample_index: Tensor | None = None) -> "Run":
        """A run over other rows (e.g. noisy copies) explaining the same target.

        It shares this run's trace and resolved layers (same model and row shape) and
        has passes of its own (nothing is declared shared at its rows).
        """
        if sample_index is None:
            sample_index = self.sample_index
        state = _InputState()
        state.trace, state.layers = self._input.trace, self._input.layers
        return Run(self.engine, x, self.target, sample_index.to(x.device), self.seed, _input=state, _parent=self)

    def retarget(self, target) -> "Run":
        """A run over the same rows explaining another target.

        It shares the input's first pass (if no gradient request used it yet), trace
        and resolved layers; gradient passes depend on the target and are its own.
        """
        if self.derived:
            raise ValueError("retarget a run of the explained input, not one of derived rows")
        bound = _bind(target, self.output)
        return Run(self.engine, self.x, bound, self.sample_index, self.seed, _input=self._input)

    # -- declaring what the shared passes hold -------------------------------------
    def share(self, methods: Sequence[Method]) -> None:
        """Declare the methods about to run, so that the shared passes at ``x`` hold what they need.

        The plain pass captures every layer the methods name (``method.layers(run)``)
        and is the one Grad-CAM reads its layer from when any of them reads the plain
        input gradient too (``method.shares_input_gradient()``); otherwise Grad-CAM's
        pass stops at its layer. The first forward, if it has not run yet, then keeps only
        what these methods can take from it. Call before the methods run.
        """
        self._declared = True
        self._shared_input_gradient = any(m.shares_input_gradient() for m in methods)
        self._shared_guided = {g for m in methods if (g := m.guided_input_gradient()) is not None}
        layers: list[nn.Module] = []
        for m in methods:
            for layer in m.layers(self):
                if all(layer is not seen for seen in layers):
                    layers.append(layer)
        if [id(m) for m in layers] != [id(m) for m in self._shared_layers]:
            self._passes.pop(("plain", ()), None)  # it captured other layers
        self._shared_layers = layers

    # -- passes at x (shared) -------------------------------------------------------
    def input_gradients(self, guided: bool | str = False) -> Tensor:
        """dF/dx at ``x`` (plain, or guided through the named activation set), computed once and shared."""
        return self._pass_at_x(guided).inputs

    def layer_gradients(self, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """``layer``'s output at ``x`` and dF/d(that output), computed once and shared.

        From the shared plain pass when it captures the layer and is needed anyway
        (a method reads the plain input gradient); else from a pass whose backward
        stops at the layer, as cheap as a layer gradient can be. Not under sliding
        windows (a layer's output exists per window only): see :meth:`layer_map`.
        """
        if self.sliding_window is not None:
            raise ValueError("under sliding windows a layer's output exists per window only; read the blended "
                             "per-window Grad-CAM with Run.layer_map")
        grads, i = self._layer_pass(layer)
        return grads.activations[i], grads.layer_gradients[i]

    def layer_map(self, layer: nn.Module) -> Tensor:
        """Under sliding windows: ``layer``'s Grad-CAM per window, blended over the volume as the outputs
        are (N, 1, *spatial), computed once and shared like :meth:`layer_gradients`."""
        if self.sliding_window is None:
            raise ValueError("Run.layer_map is the sliding-window form of Run.layer_gradients")
        grads, i = self._layer_pass(layer)
        return grads.layer_maps[i]

    def _layer_pass(self, layer: nn.Module) -> tuple[Gradients, int]:
        if any(layer is m for m in self._shared_layers) and (self._shared_input_gradient or
                                                              ("plain", ()) in self._passes):
            grads = self._pass_at_x(False)
            i = next(k for k, m in enumerate(self._shared_layers) if m is layer)
        else:
            key = ("layer", id(layer))
            if key not in self._passes:
                self._passes[key] = self._compute_at_x(layers=[layer], guided=False, input_gradient=False)
            grads, i = self._passes[key], 0
        return grads, i

    def gradients_at_layers(self, layers: Sequence[nn.Module]) -> Gradients:
        """Outputs and output gradients of several layers at ``x`` from one pass stopping at them (not cached);
        under sliding windows their blended per-window Grad-CAMs (``layer_maps``)."""
        return self._compute_at_x(layers=list(layers), guided=False, input_gradient=False)

    def layer_outputs(self, layers: Sequence[nn.Module]) -> list[Tensor]:
        """Outputs of ``layers`` at ``x``: read from the first pass while it is kept, else one forward
        (under sliding windows: on the central window of each row)."""
        first = self._input.first
        if first is not None:
            acts = [first.activation(layer) for layer in layers]
            if all(a is not None for a in acts):
                return [a.detach() for a in acts]
        return self.engine.activations(self.x, layers)

    def _pass_at_x(self, guided: bool | str) -> Gradients:
        key = ("guided" if guided else "plain", guided_types(guided))
        if key not in self._passes:
            layers = self._shared_layers if not guided else []
            self._passes[key] = self._compute_at_x(layers=layers, guided=guided, input_gradient=True)
        return self._passes[key]

    def _compute_at_x(self, *, layers: Sequence[nn.Module], guided: bool | str, input_gradient: bool) -> Gradients:
        self.start()
        first, self._input.first = self._input.first, None
        if first is not None:
            grads = self.engine.backward_recorded(first, self.target, self.sample_index, layers=layers,
                                                  guided=guided, input_gradient=input_gradient)
            if grads is not None:
                self._scores_x = grads.scores  # the target at the first forward's output: scores_at_x's values
                return grads
            if self._shared_input_gradient and ("plain", ()) not in self._passes:
                # It was kept for the declared plain pass, which comes later: serve that now, so
                # that it needs no pass of its own and no two graphs are held at once.
                plain = self.engine.backward_recorded(first, self.target, self.sample_index,
                                                      layers=self._shared_layers, input_gradient=True)
                if plain is not None:
                    self._passes[("plain", ())] = plain
            del first  # free its graph before any other pass
        # rows derived from the input are a method's own (see Engine.fold_norms); the input's are shared
        with self.engine.fold_norms() if self.derived else contextlib.nullcontext():
            return self.engine.gradients(self.x, self.target, self.sample_index, layers=layers, guided=guided,
                                         input_gradient=input_gradient)

    # -- passes at other rows -------------------------------------------------------
    def gradients(self, rows: Tensor, owner: Tensor, **kwargs) -> Gradients:
        """Scores and gradients at other rows (e.g. path points), each scored for its ``owner`` sample.

        Keyword arguments as :meth:`Engine.gradients`. Drops the kept first pass.
        """
        self.drop_first_pass()
        with self.engine.fold_norms():
            return self.engine.gradients(rows, self.target, owner, **kwargs)

    def scores(self, rows: Tensor, owner: Tensor) -> Tensor:
        """Target scores (no gradient) at other rows. Drops the kept first pass."""
        self.drop_first_pass()
        with self.engine.fold_norms():
            return self.engine.scores(rows, self.target, owner)

    def forward(self, rows: Tensor) -> Tensor:
        """The model's output (no gradient) at other rows. Drops the kept first pass."""
        self.drop_first_pass()
        with self.engine.fold_norms():
            return self.engine.forward(rows)

    def exact_model(self) -> contextlib.AbstractContextManager[None]:
        """While open, the passes run the model exactly as it came (see :meth:`Engine.exact_model`)."""
        return self.engine.exact_model()

    def drop_first_pass(self) -> None:
        """Free the kept first pass (its graph) if no gradient request used it yet."""
        self.start()  # a run of the explained input has its first forward (and its target) before any other
        self._input.first = None

    def scores_with_x(self, rows: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """F at other rows (no gradient) and F at the run's rows: in one forward over both when F(x) is not
        at hand yet (e.g. a baseline's score and the input's for a completeness check)."""
        if self.derived or self._scores_x is not None or self._input.output is not None:
            return self.scores(rows, owner), self.scores_at_x()
        both = self.scores(torch.cat([rows, self.x]), torch.cat([owner, self.sample_index]))
        return both[:rows.shape[0]], both[rows.shape[0]:]

    def scores_at_x(self) -> Tensor:
        """F at the run's rows, per row: from the first forward's output, else one forward."""
        if self._scores_x is not None:
            return self._scores_x
        if self.output is not None:
            return self.target.score(self.output, self.sample_index)
        return self.scores(self.x, self.sample_index)

    def row_chunks(self, per_sample: int, *, backward: bool = True, desc: str | None = None) -> Iterator[RowChunk]:
        """Walk ``N x per_sample`` derived rows (sample-major) in chunks that fit one pass.

        The one chunking helper of the path and perturbation methods (IG, SmoothGrad,
        Blur IG, occlusion, Guided IG). With ``desc``, a progress bar counts the rows.
        """
        n = self.x.shape[0]
        total = n * per_sample
        bar = self.engine.progress_bar(total, desc) if desc is not None else None
        try:
            for sl in self.engine.chunks(total, tuple(self.x.shape[1:]), backward=backward):
                rows = torch.arange(sl.start, sl.stop, device=self.x.device)
                sample, step = rows // per_sample, rows % per_sample
                runs = []
                for r in range(sl.start // per_sample, (sl.stop - 1) // per_sample + 1):
                    lo = max(sl.start, r * per_sample) - r * per_sample
                    hi = min(sl.stop, (r + 1) * per_sample) - r * per_sample
                    runs.append((r, lo, hi))
                yield RowChunk(sl.start, sl.stop, sample, step, self.sample_index[sample], runs)
                if bar is not None:
                    bar.update(sl.stop - sl.start)
        finally:
            if bar is not None:
                bar.close()

    # -- layers -----------------------------------------------------------------------
    def trace(self) -> list[LayerInfo]:
        """The modules in the order they run on ``x``, with output shapes: the first forward's, else one traced
        forward of one row (computed once per input)."""
        if self._input.trace is None:
            self.start(trace=True)  # if the first forward has not run yet, it records the trace
        if self._input.trace is None:
            self._input.trace = self.engine.trace(self.x)
        return self._input.trace

    def has_trace(self) -> bool:
        """True if the trace is at hand (costs no forward)."""
        return self._input.trace is not None

    def resolved(self, key: Any, resolve: Callable[[], nn.Module]) -> nn.Module:
        """``resolve()``, computed once per input and ``key`` (e.g. a Grad-CAM layer option)."""
        if key not in self._input.layers:
            self._input.layers[key] = resolve()
        return self._input.layers[key]

    # -- explaining --------------------------------------------------------------------
    def explain(self, methods: Sequence[Method], outputs: bool = True) -> Explanation:
        """Run ``methods`` on this run in turn, sharing passes; maps and extras on the CPU.

        ``outputs=False`` leaves the model's output and the explained scores out (None) where no
        method needed them (they may cost a forward pass of their own).
        """
        if self.derived:
            raise ValueError("explain the run of an input (from open_run), not one of derived rows")
        self.share(methods)
        maps: dict[str, Tensor] = {}
        seconds: dict[str, float] = {}
        extras: dict[str, dict[str, Any]] = {}
        for m in methods:
            raise_if_stop_requested()  # a stop a finaliser swallowed ends the work between methods
            start = time.perf_counter()
            result = m.attribute(self)
            if not isinstance(result, Attribution):
                raise TypeError(f"{type(m).__name__}.attribute must return an Attribution, "
                                f"got {type(result).__name__}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[m.name] = time.perf_counter() - start
            maps[m.name] = result.map.detach().to("cpu", torch.float32).contiguous()
            extras[m.name] = result.extras
        self.drop_first_pass()
        # a deferred forward is not run just to fill these in when the caller does not want them
        leave_out = not outputs and self._input.output is None and self._scores_x is None
        return Explanation(maps=maps, seconds=seconds, options={m.name: m.options() for m in methods},
                           output=None if leave_out else self.output.detach().cpu(),
                           target=self.target.describe(),
                           scores=None if leave_out else self.scores_at_x().detach().cpu(), extras=extras)

    def close(self) -> None:
        """Drop every kept pass."""
        self._input.first = None
        self._passes.clear()


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return None


def _first_forward(engine: Engine, x: Tensor, keep: bool, **record) -> tuple[Tensor, RecordedPass | None]:
    """The model's output at ``x``; with ``keep``, recorded with its graph when ``x`` fits one pass
    (``record``: what :meth:`Engine.record` keeps; never under sliding windows: the graph would
    span the whole volume)."""
    try:
        if keep and not engine.scripted and engine.sliding_window is None and engine.fits_one_pass(x):
            first = engine.record(x, **record)
            return first.output.detach(), first
        return engine.forward(x), None
    except (MemoryBudgetError, ModelOutputError):
        raise  # they say what is wrong already
    except Exception as err:
        expected = _first_conv_channels(engine.model)
        hint = ""
        if expected is not None and expected != x.shape[1]:
            hint = f" (its first convolution expects {expected} channel(s), the input has {x.shape[1]})"
        elif engine.sliding_window is not None:
            hint = f" through {engine.sliding_window!r}"
        raise ValueError(
            f"the model could not run on the input of shape {tuple(x.shape)}{hint}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _bind(target, output: Tensor) -> BoundTarget:
    if callable(target) and not isinstance(target, Target):
        target = target(output)
    return as_target(target).bind(output)


@contextlib.contextmanager
def open_run(model: nn.Module, x, target=None, *, methods: Sequence[Method] | None = None, device=None,
             batch_size: int | None = None, memory_budget: int | str | None = None, progress: bool = False,
             seed: int = 0, output_key=None, sliding_window: SlidingWindow | dict | None = None,
             defer_forward: bool = False, fold_batchnorm: bool = False) -> Iterator[Run]:
    """Prepare ``model`` to explain ``x`` and yield the :class:`Run`; the model is restored on exit.

    Args:
        model: any differentiable PyTorch model; it comes back unchanged, even after an error.
        x: input (B, C, *spatial), 1 to 3 spatial dimensions (checked by :func:`check_input`).
        target: what to explain (as for :func:`voxplain.explain`), or a function that takes
            the model's output at ``x`` and returns it (to choose it from the prediction).
        methods: the methods about to run, if known: declared before the first forward
            (:meth:`Run.share`), which then keeps only what they can take from it; without
            them it keeps everything (trace, every module's output, guided activations).
        device, batch_size, memory_budget, progress, seed, output_key,
            sliding_window: as for :func:`voxplain.explain`.
        defer_forward: let the forward at ``x`` wait until something asks for the output (see
            :meth:`Run.start`): for callers that may not need it (``explain()`` returns maps only).
        fold_batchnorm: as for :func:`voxplain.explain`.
    """
    x = check_input(x)
    window = as_sliding_window(sliding_window)
    if not (callable(target) and not isinstance(target, Target)):
        target = as_target(target)
    with Engine(model, device=device, batch_size=batch_size, memory_budget=memory_budget,
                progress=progress, output_key=output_key, sliding_window=window,
                fold_batchnorm=fold_batchnorm) as engine:
        run = Run(engine, x.to(engine.device), target, None, seed, defer_forward=defer_forward)
        try:
            if methods is not None:
                run.share(methods)
            run.start()
            yield run
        finally:
            run.close()
