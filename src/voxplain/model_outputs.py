"""Which tensor of a model's output is explained: models may return a tuple, a list or a dict."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["ModelOutputError", "select_output"]


class ModelOutputError(ValueError):
    """The model's output is not one tensor and no ``output_key`` says which to explain."""


def select_output(out, key=None) -> Tensor:
    """The tensor to explain from a model's output: the output itself, or ``out[key]`` for a tuple, list or dict.

    Raises :class:`ModelOutputError` saying what came and what is expected.
    """
    expected = "voxplain explains one output tensor, (B, K) or (B, K, *spatial)"
    if key is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, (tuple, list)):
            shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, Tensor) else type(o).__name__ for o in out)
            raise ModelOutputError(f"the model returned a {type(out).__name__} of {len(out)} outputs ({shapes}); "
                                   f"{expected}: choose one with output_key=INDEX (--output-key INDEX on the "
                                   "command line)")
        if isinstance(out, Mapping):
            keys = ", ".join(repr(k) for k in list(out)[:8])
            raise ModelOutputError(f"the model returned a {type(out).__name__} with keys {keys}; {expected}: choose "
                                   "one with output_key=KEY (--output-key KEY on the command line)")
        raise ModelOutputError(f"the model returned a {type(out).__name__}; {expected}")
    if isinstance(out, Tensor):
        raise ModelOutputError(f"output_key={key!r} was given, but the model returns a single tensor of shape "
                               f"{tuple(out.shape)}; leave output_key out")
    try:
        chosen = out[key]
    except (KeyError, IndexError, TypeError):
        what = (f"keys {', '.join(repr(k) for k in list(out)[:8])}" if isinstance(out, Mapping)
                else f"{len(out)} outputs (indices 0..{len(out) - 1})" if isinstance(out, (tuple, list))
                else type(out).__name__)
        raise ModelOutputError(f"output_key={key!r} does not select an output: the model returned {what}") from None
    if not isinstance(chosen, Tensor):
        raise ModelOutputError(f"output_key={key!r} selects a {type(chosen).__name__}, not a tensor; {expected}")
    return chosen
