"""Explanation methods, one module per family, and their registry."""

from .base import Method, Run
from .registry import available_methods, create_method, method_class, option_names, register

# Importing a family module registers its methods.
from . import gradient  # noqa: E402,F401

__all__ = ["Method", "Run", "available_methods", "create_method", "method_class", "option_names", "register"]
