"""Explanation methods, one module per family, and their registry."""

from .base import Attribution, Method
from .registry import (DEFAULT_METHODS, available_methods, create_method, create_methods, method_class,
                       option_names, register)

# Importing a family module registers its methods.
from . import gradient  # noqa: E402,F401
from . import guided_backprop  # noqa: E402,F401
from . import gradcam  # noqa: E402,F401
from . import integrated_gradients  # noqa: E402,F401
from . import guided_ig  # noqa: E402,F401
from . import smoothgrad  # noqa: E402,F401
from . import blur_ig  # noqa: E402,F401
from . import occlusion  # noqa: E402,F401
from . import xrai  # noqa: E402,F401

__all__ = ["Method", "Attribution", "DEFAULT_METHODS", "available_methods", "create_method", "create_methods",
           "method_class", "option_names", "register"]
