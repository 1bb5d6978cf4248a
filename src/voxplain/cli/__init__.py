"""The `voxplain` command: thin subcommands over the library, no logic of their own.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can fix
(bad input, missing file) end the program with exit code 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import warnings
from pathlib import Path

from ..interrupt import Terminated, clear_stop_request, raise_if_stop_requested, request_stop

__all__ = ["main", "SUBCOMMANDS", "UserError", "Terminated"]

_PACKAGE = Path(__file__).resolve().parent.parent  # the voxplain package folder

#: subcommand name -> module (relative to this package), in the order shown by --help
SUBCOMMANDS: dict[str, str] = {
    "phantom": "phantom",
    "train": "train",
    "demo": "demo",
    "explain": "explain",
    "inspect": "inspect",
    "evaluate": "evaluate",
    "sweep": "sweep",
}


class UserError(Exception):
    """An error caused by the command's input; printed as one line, exit code 2."""


def _stop(signum, frame):
    request_stop(signum)


@contextlib.contextmanager
def _signals_as_exceptions():
    """While a command runs, SIGTERM and Ctrl-C unwind it (cleaning up) instead of killing the process outright.

    The request is also recorded (:mod:`voxplain.interrupt`), so that one raised where
    Python drops exceptions (a finaliser) still stops the work before its output is kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear_stop_request()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
        raise_if_stop_requested()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_stop_request()


def _out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, MemoryError) or isinstance(err, getattr(torch, "OutOfMemoryError", ()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxplain",
        description="Explain what convolutional networks see in 2D and 3D medical images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f".{module_name}", __name__)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           epilog=getattr(module, "EXAMPLES", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``voxplain`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 1
    with warnings.catch_warnings():
        if getattr(args, "quiet", False):
            warnings.simplefilter("ignore")
        warnings.showwarning = _show_warning
        return _run(parser, args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """voxplain's own warnings as one line for the user (no source line); others as Python shows them."""
    out = file if file is not None else sys.stderr
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        out.write(f"voxplain: warning: {message}\n")
    else:
        out.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        with _signals_as_exceptions():
            return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("voxplain: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("voxplain: terminated", file=sys.stderr)
        return 143
    except (MemoryError, RuntimeError) as err:
        if _out_of_memory(err):
            print(f"voxplain {args.command}: error: out of memory ({type(err).__name__}); lower --memory-budget "
                  "or --batch-size, give fewer steps or samples, or crop the input", file=sys.stderr)
            return 2
        return _report(args.command, err)
    except (UserError, ValueError, TypeError, IndexError, FileNotFoundError, OSError) as err:
        return _report(args.command, err)


def _report(command: str, err: BaseException) -> int:
    """Print a user-fixable error as one line; exit code 2."""
    reason = " ".join(str(err).split()) or type(err).__name__
    print(f"voxplain {command}: error: {reason}", file=sys.stderr)
    return 2
