"""The memory layout the engine runs a model in: as it came, or channels-last where that is faster.

Convolutions on CPU (oneDNN) and on recent GPUs often run faster with the channels
innermost (``torch.channels_last`` for 2D, ``torch.channels_last_3d`` for 3D). Whether a
given model, input shape and pass kind (forward only, or forward and backward) gains is
measured, not assumed: the first passes of a long enough piece of work alternate the two
layouts and time themselves, and the faster one (by a clear margin) is kept for that row
shape and pass kind. The passes of a trial are real work: only the slower layout's share
of the first few passes is lost. The choice is remembered for the model (weakly: it goes
with the model), its device, dtype and the thread count, so that later engines on the same
model (each ``explain()`` call opens one) do not measure again. It decides speed only:
maps are the same in either layout.

The model's parameters are laid out to match the rows (and back as they came when the
engine restores the model); maps come back in the input's layout.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Layout", "channels_last_format"]

#: Passes of a trial, in order: None = the layout the model came in, else channels-last. The
#: first pass of each layout warms up (new kernels, new buffers); the quicker of the others is
#: compared (one pass each would let a moment's load decide).
_TRIAL = (None, "cl", None, "cl", None, "cl")
#: A trial runs only where a piece of work has at least this many passes left after the trial.
_TRIAL_MIN_LEFT = 2
#: Passes quicker than this are too short to time reliably (and too cheap to matter): no trial.
_TRIAL_MIN_SECONDS = 0.005
#: A trial's passes take at least this many rows each: a layout's gain on batches is not its gain
#: on one row (measured on a 2D CNN, channels-last: 1.4x faster per row on 2-16 rows, slower on one).
TRIAL_MIN_ROWS = 2
#: Work (estimated bytes of all its passes) from which a walk is cut into enough passes for a trial.
_TRIAL_MIN_WORK_BYTES = 64 * 1024**2
#: Channels-last is kept only if its pass takes at most this fraction of the other's time.
_MARGIN = 0.9

#: Choices measured per model: model -> {(device, dtype, threads): {(row shape, backward): format}}.
#: Weak, so a model's entry goes with the model; it holds timing decisions only, never tensors.
_CHOICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def channels_last_format(row_ndim: int) -> torch.memory_format | None:
    """The channels-last format for rows of ``row_ndim`` dims (C, *spatial): 2D and 3D images only."""
    return {3: torch.channels_last, 4: torch.channels_last_3d}.get(row_ndim)


class Layout:
    """The memory layout of one engine's passes, chosen per row shape and pass kind.

    Args:
        engine: the engine whose model and passes it lays out.
        channels_last: ``None`` (default) measures; ``True`` uses channels-last wherever the
            model has convolution weights of the rows' rank; ``False`` never does.
    """

    def __init__(self, engine: "Engine", channels_last: bool | None = None) -> None:
        self.engine = engine
        self.channels_last = channels_last
        # (row shape, backward) -> format (None: as the model came); absent: not decided yet
        self.chosen: dict[tuple[tuple[int, ...], bool], torch.memory_format | None] = {}
        self.timings: dict[tuple[tuple[int, ...], bool], dict[str, float]] = {}
        self._model_format: torch.memory_format | None = None
        self._trying: set[tuple[tuple[int, ...], bool]] = set()
        self._pinned = 0  # > 0 while in_model_layout() is open

    def attach(self) -> None:
        """Share the choices already measured on this model in the same setting (the engine's entry)."""
        if self.channels_last is not None or self.engine._state is None:
            return
        dtype = next((t.dtype for t in self.engine._state.tensors if t.is_floating_point()), None)
        setting = (str(self.engine.device), dtype, torch.get_num_threads())
        try:
            per_model = _CHOICES.setdefault(self.engine.model, {})
        except TypeError:  # a model that cannot be weakly referenced: measure per engine
            return
        shared = per_model.setdefault(setting, {})
        for key, fmt in self.chosen.items():  # what this engine chose before, in another setting or none
            shared.setdefault(key, fmt)
        self.chosen = shared

    # -- running in a layout -----------------------------------------------------
    def arrange(self, x: Tensor) -> Tensor:
        """Rows ``x`` in the layout chosen for their shape and pass kind; the model laid out to match.

        One row runs in the layout the model came in unless channels-last is forced: the trials
        measure batches, and a layout faster on batches can be slower on one row.
        """
        if self._pinned or (x.shape[0] == 1 and not self.channels_last):
            fmt = None
        else:
            fmt = self.chosen.get((tuple(x.shape[1:]), torch.is_grad_enabled()))
        if fmt is not self._model_format:
            self._lay_out_model(fmt)
        return x if fmt is None else x.contiguous(memory_format=fmt)

    @contextlib.contextmanager
    def in_model_layout(self) -> Iterator[None]:
        """While open, every pass runs in the layout the model came in, and no trial runs.

        For work whose maps depend on the kernels' rounding more than on any layout's speed
        (see :class:`~voxplain.methods.blur_ig.BlurIG`)."""
        self._pinned += 1
        try:
            yield
        finally:
            self._pinned -= 1

    def as_input(self, grad: Tensor, x: Tensor) -> Tensor:
        """``grad`` (dF/dx) in the layout of the rows ``x`` it belongs to."""
        if grad.stride() == x.stride():
            return grad
        return torch.empty_like(x, memory_format=torch.preserve_format).copy_(grad)

    def forget_model_format(self) -> None:
        """The model was restored as it came (the engine's exit)."""
        self._model_format = None

    def _lay_out_model(self, fmt: torch.memory_format | None) -> None:
        state = self.engine._state
        if state is None:
            return
        if fmt is None:
            state.restore_layout()
        else:
            rank = 4 if fmt is torch.channels_last else 5
            for t in state.tensors:
                if t.ndim == rank and t.is_floating_point():
                    t.data = t.data.contiguous(memory_format=fmt)
        self._model_format = fmt

    # -- choosing -------------------------------------------------------------------
    def candidate(self, row_shape: tuple[int, ...]) -> torch.memory_format | None:
        """The channels-last format worth considering for rows of ``row_shape``, or None."""
        fmt = channels_last_format(len(row_shape))
        if fmt is None or self.channels_last is False or self.engine.scripted or self.engine._state is None:
            return None
        rank = len(row_shape) + 1
        if not any(t.ndim == rank and t.is_floating_point() for t in self.engine._state.tensors):
            return None  # no convolution weight of that rank: nothing to gain
        return fmt

    @property
    def trial_passes(self) -> int:
        """Passes a piece of work needs for a trial to run on it."""
        return len(_TRIAL) + _TRIAL_MIN_LEFT

    def passes_for_trial(self, n_rows: int, n_chunks: int, row_shape: tuple[int, ...], backward: bool,
                         work_bytes: Callable[[], int]) -> int:
        """How many passes a walk of ``n_rows`` rows, planned as ``n_chunks`` passes, takes: ``n_chunks``,
        or :attr:`trial_passes` where it is too few for a trial that is wanted and the cut gives that
        many passes of at least :data:`TRIAL_MIN_ROWS` rows (a cut that runs no trial would only make
        the call slower). ``work_bytes()`` (an estimate that may cost a forward pass) is asked last."""
        trial = self.trial_passes
        if n_chunks >= trial or trial * TRIAL_MIN_ROWS > n_rows:
            return n_chunks
        if len(range(0, n_rows, math.ceil(n_rows / trial))) < trial:  # equal passes: fewer come out
            return n_chunks
        return trial if self.wants_trial(row_shape, backward, work_bytes()) else n_chunks

    def wants_trial(self, row_shape: tuple[int, ...], backward: bool, work_bytes: int) -> bool:
        """True if work of ``work_bytes`` (estimated) on rows of ``row_shape`` should run a trial
        (so is worth cutting into :attr:`trial_passes` passes)."""
        key = (tuple(row_shape), bool(backward))
        return (self.channels_last is None and key not in self.chosen and key not in self._trying
                and work_bytes >= _TRIAL_MIN_WORK_BYTES and self.candidate(key[0]) is not None)

    def over(self, items: Iterable[Any], row_shape: tuple[int, ...], backward: bool, n_items: int,
             rows_of: Callable[[Any], int]) -> Iterator[Any]:
        """Yield ``items`` (``n_items`` pieces of work, each one pass of ``rows_of(item)`` rows of
        ``row_shape``), choosing the layout for that row shape and pass kind on the way.

        If it is not chosen yet and enough pieces follow, the first ones are a trial that
        alternates the layouts and times each piece (from its yield to the next request).
        """
        key = (tuple(row_shape), bool(backward))
        if key in self.chosen or key in self._trying or self._pinned:
            yield from items
            return
        fmt = self.candidate(key[0])
        if fmt is None or self.channels_last is True:
            self.chosen[key] = fmt
            yield from items
            return
        if n_items < self.trial_passes:
            yield from items
            return
        self._trying.add(key)
        per_row: dict[str, list[float]] = {"channels_first": [], "channels_last": []}
        try:
            it = iter(items)
            for i, which in enumerate(_TRIAL):
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.chosen[key] = None if which is None else fmt
                start = self._clock()
                yield item
                seconds = self._clock() - start
                if i == 0 and seconds < _TRIAL_MIN_SECONDS:
                    break  # too quick to time or to matter: keep the layout the model came in
                if i >= 2:
                    name = "channels_first" if which is None else "channels_last"
                    per_row[name].append(seconds / max(1, rows_of(item)))
            best = {name: min(times) for name, times in per_row.items() if times}
            faster = len(best) == 2 and best["channels_last"] <= _MARGIN * best["channels_first"]
            self.chosen[key] = fmt if faster else None
            if best:
                self.timings[key] = best
            self._trying.discard(key)
            yield from it
        finally:
            if key in self._trying:  # stopped during the trial: nothing decided
                self._trying.discard(key)
                self.chosen.pop(key, None)

    def _clock(self) -> float:
        device = self.engine.device
        if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize(device)
        # Wall time, not the process's CPU time: channels-last kernels often use the threads
        # better (more CPU seconds, fewer wall seconds), and the wall seconds are what a user waits.
        # The trial alternates the layouts, so load that drifts hits both alike.
        return time.perf_counter()
