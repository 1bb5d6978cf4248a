"""Remember that the user asked the process to stop, so that the request cannot be lost.

The command line turns SIGTERM into :class:`Terminated` and Ctrl-C into
``KeyboardInterrupt``. Python raises those inside whatever code runs when the signal
arrives; if that code is a finaliser (``__del__``, e.g. nibabel's array proxy) or a
callback whose errors are ignored, the exception is printed and dropped and the work
would go on to finish as if nothing happened. The handler therefore also records
the request here, and the places that make results visible (the atomic writers) call
:func:`raise_if_stop_requested` first: a stop that was swallowed still ends the work
there, with the half-built output removed.
"""

from __future__ import annotations

import signal

__all__ = ["Terminated", "request_stop", "clear_stop_request", "stop_requested", "raise_if_stop_requested"]


class Terminated(BaseException):
    """SIGTERM arrived: raised like Ctrl-C's KeyboardInterrupt so that half-written outputs are removed."""


_requested: int | None = None  # the signal number of the pending request


def request_stop(signum: int) -> None:
    """Record that signal ``signum`` asked the process to stop, and raise its exception."""
    global _requested
    _requested = signum
    raise_if_stop_requested()


def clear_stop_request() -> None:
    """Forget a recorded request (a new command starts)."""
    global _requested
    _requested = None


def stop_requested() -> bool:
    """Whether a stop was requested since the last :func:`clear_stop_request`."""
    return _requested is not None


def raise_if_stop_requested() -> None:
    """Raise :class:`Terminated` (SIGTERM) or ``KeyboardInterrupt`` (any other signal) if a stop was requested."""
    if _requested is None:
        return
    if _requested == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()
