"""The memory layout the engine runs a model in: as it came, or channels-last where that is faster.

Convolutions on CPU (oneDNN) and on recent GPUs often run faster with the channels
innermost (``torch.channels_last`` for 2D, ``torch.channels_last_3d`` for 3D). Whether a
given model gains, for a row shape, a pass kind (forward only, or forward and backward) and
one row or several per pass, is measured, not assumed, by a trial: probe passes over rows of
that shape (a row of the explained input where the engine saw one, else zeros) alternate the
two layouts and are timed, and the faster layout (by a clear margin) is kept. The trial runs
at the start of a walk (all the passes of one piece of work), before any of its passes, and
a walk runs in one layout from its first pass to its last: maps never mix layouts.

A trial costs a few probe passes, so it runs only where it pays: on a walk of many passes,
or on a kind of pass the model met in an earlier walk (a second call on the same model, the
usual case in a cohort or a benchmark). The choice is remembered for the model (weakly: it
goes with the model), its device, dtype and the thread count, so that later engines on the
same model (each ``explain()`` call opens one) do not measure again. It decides speed only:
maps agree across layouts to float rounding.

The model's parameters are laid out to match the rows (and back as they came when the
engine restores the model); maps come back in the input's layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Layout", "channels_last_format", "model_layout_only"]

#: Probe passes of a trial, in order: None = the layout the model came in, else channels-last. The
#: first probe of each layout warms up (new kernels, new buffers); the quickest of the others is
#: compared (one probe each would let a moment's load decide).
_TRIAL = (None, "cl") * 4
#: A walk of at least this many passes runs a trial on its first meeting (its probes then cost
#: little against the walk); a shorter one runs it from the second meeting of its kind of pass on.
_TRIAL_MIN_PASSES = 16
#: Passes quicker than this are too short to time reliably (and too cheap to matter): no trial.
_TRIAL_MIN_SECONDS = 0.005
#: Models whose row needs less than this (estimated) are never probed: their passes are too cheap for
#: the layout to matter, and their maps stay the same from process to process (toy models, tests).
_TRIAL_MIN_ROW_BYTES = 12 * 1024**2
#: Channels-last is kept only if its probe takes at most this fraction of the other's time.
_MARGIN = 0.9

#: A choice's key: (row shape, backward, one row per pass). One row and a batch are measured apart:
#: on a 2D CNN at 112^2 channels-last was 1.3-1.4x faster per row on 2-16 rows, no faster on one.
Key = tuple[tuple[int, ...], bool, bool]


@dataclass
class _Measured:
    """What trials decided for one model in one setting, and the kinds of pass it has met."""

    chosen: dict[Key, torch.memory_format | None] = field(default_factory=dict)
    met: set[Key] = field(default_factory=set)


#: Choices measured per model: model -> {(device, dtype, threads): _Measured}.
#: Weak, so a model's entry goes with the model; it holds timing decisions only, never tensors.
_CHOICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_UNSET = object()
#: True inside model_layout_only(): engines opened there measure nothing and keep the model's layout.
_MODEL_LAYOUT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("voxplain_model_layout_only",
                                                                          default=False)


@contextlib.contextmanager
def model_layout_only() -> Iterator[None]:
    """While open (also as a decorator), engines that would measure the layout run every pass in the
    model's own layout instead.

    For results that must be the same to the byte wherever they are computed: a trial's
    choice depends on timing, and a kind of pass is measured from its second meeting on, so
    the layout (and the rounding of the last bits) can differ between one process that
    sees every case and cluster workers that see a few each. The evaluation commands'
    metrics are such results.
    """
    token = _MODEL_LAYOUT_ONLY.set(True)
    try:
        yield
    finally:
        _MODEL_LAYOUT_ONLY.reset(token)


def channels_last_format(row_ndim: int) -> torch.memory_format | None:
    """The channels-last format for rows of ``row_ndim`` dims (C, *spatial): 2D and 3D images only."""
    return {3: torch.channels_last, 4: torch.channels_last_3d}.get(row_ndim)


def choice_key(row_shape, backward: bool, rows: int) -> Key:
    """The key a layout choice is kept under for passes of ``rows`` rows of ``row_shape``."""
    return tuple(row_shape), bool(backward), rows == 1


class Layout:
    """The memory layout of one engine's passes, chosen per row shape, pass kind and pass size.

    Args:
        engine: the engine whose model and passes it lays out.
        channels_last: ``None`` (default) measures; ``True`` uses channels-last wherever the
            model has convolution weights of the rows' rank; ``False`` never does.
    """

    def __init__(self, engine: "Engine", channels_last: bool | None = None) -> None:
        self.engine = engine
        self.channels_last = False if channels_last is None and _MODEL_LAYOUT_ONLY.get() else channels_last
        self._measured = _Measured()
        self.timings: dict[Key, dict[str, float]] = {}
        self._model_format: torch.memory_format | None = None
        # while the model is laid out otherwise: each weight's tensor as it came, and the copies per format
        self._originals: dict[Tensor, Tensor] = {}
        self._copies: dict[torch.memory_format, dict[Tensor, Tensor]] = {}
        # (row shape, backward) -> (format held, rows per pass) of the walk open over such rows (see walk)
        self._held: dict[tuple[tuple[int, ...], bool], tuple[torch.memory_format | None, int]] = {}
        self._forced = _UNSET  # the format of a trial's probe while it runs
        self._pinned = 0  # > 0 while in_model_layout() is open
        self._weight_ranks: dict[int, bool] = {}  # rank -> whether the model has floating weights of that rank

    @property
    def chosen(self) -> dict[Key, torch.memory_format | None]:
        """Decided formats (None: as the model came) per :func:`choice_key`; absent: not decided yet."""
        return self._measured.chosen

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
        shared = per_model.setdefault(setting, _Measured())
        for key, fmt in self.chosen.items():  # what this engine chose before, in another setting or none
            shared.chosen.setdefault(key, fmt)
        shared.met |= self._measured.met
        self._measured = shared

    # -- running in a layout -----------------------------------------------------
    def arrange(self, x: Tensor) -> Tensor:
        """Rows ``x`` in the layout of the walk they belong to (else the one chosen for their kind of
        pass, else the model's own); the model laid out to match."""
        fmt = self._format_for(tuple(x.shape[1:]), torch.is_grad_enabled(), x.shape[0])
        if fmt is not self._model_format:
            self._lay_out_model(fmt)
        return x if fmt is None else x.contiguous(memory_format=fmt)

    def _format_for(self, row_shape: tuple[int, ...], backward: bool, rows: int) -> torch.memory_format | None:
        if self._pinned:
            return None
        if self._forced is not _UNSET:
            return self._forced
        held = self._held.get((row_shape, backward))
        if held is not None:
            return held[0]
        if self.channels_last is None:
            return self.chosen.get(choice_key(row_shape, backward, rows))
        return self._decided(choice_key(row_shape, backward, rows))

    @contextlib.contextmanager
    def walk(self, rows: int, row_shape, backward: bool, n_passes: int,
             probe: Callable[[int], None]) -> Iterator[None]:
        """Hold one layout for every pass of a walk: ``n_passes`` passes of ``rows`` rows (the last may
        have fewer) of ``row_shape``; ``probe(rows)`` runs one pass of that size, for a trial.

        The layout is the one chosen for this kind of pass, decided here if it is not yet (a trial,
        where it pays: see the module's notes), or the model's own under :meth:`in_model_layout`. A
        walk opened inside another over the same rows (a pass of the outer walk chunked again) is
        the outer walk's: its layout and its rows per pass (:meth:`walk_rows`).
        """
        held_key = (tuple(row_shape), bool(backward))
        if held_key in self._held:
            yield
            return
        fmt = None if self._pinned else self._decided(choice_key(row_shape, backward, rows), rows, n_passes, probe)
        self._held[held_key] = (fmt, rows)
        try:
            yield
        finally:
            del self._held[held_key]

    def walk_rows(self, row_shape, backward: bool) -> int:
        """Rows per pass of the walk open over rows of ``row_shape`` and that pass kind (1 if none is open)."""
        held = self._held.get((tuple(row_shape), bool(backward)))
        return 1 if held is None else held[1]

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

    def _lay_out_model(self, fmt: torch.memory_format | None) -> None:
        """Lay the model's weights out in ``fmt`` (None: as they came). The weights as they came are kept
        and put back as they are (same storage, no copy); each layout's copies are made once per engine."""
        state = self.engine._state
        if state is None:
            return
        if fmt is None:
            for t, original in self._originals.items():
                t.data = original
            state.restore_layout()
        else:
            rank = 4 if fmt is torch.channels_last else 5
            copies = self._copies.setdefault(fmt, {})
            for t in state.tensors:
                if t.ndim == rank and t.is_floating_point():
                    original = self._originals.setdefault(t, t.data)
                    if t not in copies:
                        copies[t] = original.contiguous(memory_format=fmt)
                    t.data = copies[t]
        self._model_format = fmt

    def original(self, t: Tensor) -> Tensor:
        """Parameter or buffer ``t``'s tensor as the model came (``t`` itself unless laid out otherwise)."""
        return self._originals.get(t, t)

    def forget_model_format(self) -> None:
        """The engine restored the model (its exit): put the weights as they came back, drop the copies."""
        if self._model_format is not None:
            for t, original in self._originals.items():
                t.data = original
        self._originals.clear()
        self._copies.clear()
        self._weight_ranks.clear()
        self._model_format = None

    # -- choosing -------------------------------------------------------------------
    def candidate(self, row_shape: tuple[int, ...]) -> torch.memory_format | None:
        """The channels-last format worth considering for rows of ``row_shape``, or None."""
        fmt = channels_last_format(len(row_shape))
        if fmt is None or self.channels_last is False or self.engine.scripted or self.engine._state is None:
            return None
        rank = len(row_shape) + 1
        if rank not in self._weight_ranks:
            self._weight_ranks[rank] = any(t.ndim == rank and t.is_floating_point() for t in self.engine._state.tensors)
        return fmt if self._weight_ranks[rank] else None  # no convolution weight of that rank: nothing to gain

    def may_probe(self, row_shape) -> bool:
        """Whether a trial may ever probe rows of ``row_shape``: the layout is measured, channels-last is a
        candidate, and the row is not known to be too small to try."""
        if self.channels_last is not None or self.candidate(tuple(row_shape)) is None:
            return False
        per_row = self.engine._row_bytes.get(tuple(row_shape))
        return per_row is None or per_row >= _TRIAL_MIN_ROW_BYTES

    def _decided(self, key: Key, rows: int = 1, n_passes: int = 1,
                 probe: Callable[[int], None] | None = None) -> torch.memory_format | None:
        """The format for passes of ``key``: the one chosen, else decided now where that is cheap or pays
        (no candidate, a forced layout, a trial that is due), else the model's own (undecided)."""
        if key in self.chosen:
            return self.chosen[key]
        fmt = self.candidate(key[0])
        if fmt is None or self.channels_last is not None:
            self.chosen[key] = fmt
            return fmt
        if probe is not None and self._trial_due(key, n_passes):
            self.chosen[key] = self._trial(key, fmt, lambda: probe(rows))
            return self.chosen[key]
        self._measured.met.add(key)
        return None

    def _trial_due(self, key: Key, n_passes: int) -> bool:
        if key not in self._measured.met and n_passes < _TRIAL_MIN_PASSES:
            return False  # a first, short walk: not worth probing (yet)
        per_row = self.engine._row_bytes.get(key[0])  # known once the model ran on such rows
        return per_row is not None and per_row >= _TRIAL_MIN_ROW_BYTES

    def _trial(self, key: Key, fmt: torch.memory_format, probe: Callable[[], None]) -> torch.memory_format | None:
        """Time ``probe`` in each layout (:data:`_TRIAL`) and return the faster by :data:`_MARGIN`."""
        seconds: dict[str, list[float]] = {"channels_first": [], "channels_last": []}
        try:
            for i, which in enumerate(_TRIAL):
                self._forced = None if which is None else fmt
                start = self._clock()
                probe()
                taken = self._clock() - start
                if i == 0 and taken < _TRIAL_MIN_SECONDS:
                    return None  # too quick to time or to matter: the layout the model came in
                if i >= 2:
                    seconds["channels_first" if which is None else "channels_last"].append(taken)
        except Exception:  # a probe the model refuses decides nothing: the work itself goes on as it came
            return None
        finally:
            self._forced = _UNSET
        best = {name: min(times) for name, times in seconds.items()}
        self.timings[key] = best
        return fmt if best["channels_last"] <= _MARGIN * best["channels_first"] else None

    def _clock(self) -> float:
        device = self.engine.device
        if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize(device)
        # Wall time, not the process's CPU time: channels-last kernels often use the threads
        # better (more CPU seconds, fewer wall seconds), and the wall seconds are what a user waits.
        # The trial alternates the layouts, so load that drifts hits both alike.
        return time.perf_counter()
