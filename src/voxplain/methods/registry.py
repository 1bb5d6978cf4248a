"""The registry of explanation methods: canonical snake_case names to classes."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Method

__all__ = ["register", "method_class", "create_method", "create_methods", "available_methods", "option_names",
           "DEFAULT_METHODS"]

#: NeuroXAI's seven methods, run when no list is given (by ``explain`` and ``voxplain explain``).
DEFAULT_METHODS: tuple[str, ...] = (
    "vanilla_gradient",
    "guided_backprop",
    "integrated_gradients",
    "guided_ig",
    "smoothgrad",
    "gradcam",
    "guided_gradcam",
)

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    """The class registered under ``name``; a clear error (with suggestions) if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"a method is named by a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}.{hint} Available methods: {', '.join(available_methods())}"
        ) from None


def option_names(cls: type["Method"]) -> list[str]:
    """The option names a method class accepts (its keyword arguments)."""
    return list(_option_names(cls, cls.__init__))


@functools.lru_cache(maxsize=None)
def _option_names(cls: type["Method"], init) -> tuple[str, ...]:
    # keyed on __init__ too: a class whose __init__ is replaced is read again
    if init is object.__init__:  # no options (and no signature to read from a builtin)
        return ()
    params = inspect.signature(init).parameters
    return tuple(p.name for p in params.values()
                 if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def create_method(name: str, options: dict[str, Any] | None = None) -> "Method":
    """Instantiate the method ``name`` with ``options``; unknown option names are errors."""
    cls = method_class(name)
    options = dict(options or {})
    valid = option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {name!r}; valid options: {valid or 'none'}"
        )
    return cls(**options)


def create_methods(methods: "str | Method | Sequence[str | Method] | None",
                   options: Mapping[str, Mapping[str, Any]] | None = None) -> list["Method"]:
    """Method objects for ``methods`` (names or objects; default :data:`DEFAULT_METHODS`).

    ``options`` maps a method name to its options. A method named twice, or options
    for a method that is not run, is an error.
    """
    from .base import Method

    if methods is None:
        methods = DEFAULT_METHODS
    if isinstance(methods, (str, Method)):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty: name at least one method (or pass None for NeuroXAI's seven); "
                         f"available: {', '.join(available_methods())}")
    options = dict(options or {})
    built: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            built.append(m)
        else:
            built.append(create_method(m, options.get(m)))
    names = [m.name for m in built]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method(s) {duplicates} given more than once")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for method(s) {stray} that are not among the methods run: {names}")
    return built
