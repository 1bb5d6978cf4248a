"""voxplain: explain what convolutional networks see in 2D and 3D medical images."""

from .display import percentile_normalise, reduce_channels
from .engine import Engine
from .explain import DEFAULT_METHODS, Explanation, explain, explain_detailed, gradcam_per_layer
from .methods import Attribution, Method, available_methods, create_method
from .methods.gradient import GradientXInput, VanillaGradient
from .methods.gradcam import GradCAM, GuidedGradCAM
from .methods.guided_backprop import GuidedBackprop
from .methods.guided_ig import GuidedIG
from .methods.integrated_gradients import IntegratedGradients
from .methods.smoothgrad import SmoothGrad, SmoothGradIG
from .methods.blur_ig import BlurIG
from .methods.occlusion import Occlusion
from .methods.xrai import XRAI
from .run import Run, open_run
from .targets import BratsRegionTarget, ClassTarget, SegmentationTarget, Target

__version__ = "0.1.0"

__all__ = [
    "explain", "explain_detailed", "Explanation", "DEFAULT_METHODS",
    "ClassTarget", "SegmentationTarget", "BratsRegionTarget", "Target",
    "Engine", "Run", "open_run", "Method", "Attribution", "available_methods", "create_method",
    "VanillaGradient", "GradientXInput",
    "GuidedBackprop", "GradCAM", "GuidedGradCAM", "gradcam_per_layer",
    "IntegratedGradients", "GuidedIG", "SmoothGrad", "SmoothGradIG",
    "BlurIG", "Occlusion", "XRAI",
    "reduce_channels", "percentile_normalise",
]
