"""Model zoo, checkpoints (save / safe loading) and training loops."""

from .checkpoint import load_model, read_checkpoint_config, save_checkpoint
from .training import train
from .zoo import available_models, build_model, describe_model

__all__ = ["build_model", "available_models", "describe_model", "save_checkpoint", "load_model",
           "read_checkpoint_config", "train"]
