"""The model zoo: build a network by name and keyword configuration.

Every model built here remembers how it was built (``model.voxplain_config``:
``{"model": name, "model_config": {...}}``), so a checkpoint can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .convnet import ConvClassifier
from .unet import InterpUNet, RegionUNet

__all__ = ["build_model", "available_models", "describe_model", "model_task", "model_dims"]


def _cnn2d(in_channels: int = 1, num_classes: int = 2, blocks: int = 3, base_width: int = 16,
           max_width: int = 128, image_size=None, dropout: float = 0.3, global_pool: str = "avg") -> nn.Module:
    return ConvClassifier(dims=2, in_channels=in_channels, num_classes=num_classes, blocks=blocks,
                          base_width=base_width, max_width=max_width, image_size=image_size, dropout=dropout,
                          global_pool=global_pool)


def _classifier3d(in_channels: int = 4, num_classes: int = 2, blocks: int = 4, base_width: int = 8,
                  max_width: int = 64, image_size=None, dropout: float = 0.3, global_pool: str = "avg") -> nn.Module:
    return ConvClassifier(dims=3, in_channels=in_channels, num_classes=num_classes, blocks=blocks,
                          base_width=base_width, max_width=max_width, image_size=image_size, dropout=dropout,
                          global_pool=global_pool)


def _unet3d(in_channels: int = 4, out_channels: int = 3, channels=(8, 16, 32, 64), num_res_units: int = 1,
            dropout: float = 0.0) -> nn.Module:
    return RegionUNet(dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
                      num_res_units=num_res_units, dropout=dropout)


def _unet3d_interp(in_channels: int = 4, out_channels: int = 3, channels=(8, 16, 32, 64), convs=None,
                   down: str = "max", up: str = "linear") -> nn.Module:
    return InterpUNet(dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels, convs=convs,
                      down=down, up=up)


def _resnet3d(in_channels: int = 4, num_classes: int = 2, layers=(1, 1, 1, 1), widths=(8, 16, 32, 64),
              stem_kernel: int = 3, image_size=None) -> nn.Module:
    # image_size is accepted like the other classifiers' (the network pools globally, any size fits)
    from monai.networks.nets import ResNet

    model = ResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=3,
                   n_input_channels=in_channels, conv1_t_size=stem_kernel, conv1_t_stride=1,
                   num_classes=num_classes, act="relu", norm="batch")
    # MONAI's residual blocks keep their own in-place ReLUs; in-place ops break backward hooks
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


#: name -> (factory, task, spatial dims, one-line description)
_MODELS: dict[str, tuple[Callable[..., nn.Module], str, int, str]] = {
    "cnn2d": (_cnn2d, "classify", 2,
              "CXAI-style 2D CNN: `blocks` (3/5/7) conv-BN-ReLU-maxpool blocks, GAP, dropout, linear"),
    "classifier3d": (_classifier3d, "classify", 3, "3D CNN classifier (e.g. glioma grade HGG vs LGG on 4 modalities)"),
    "resnet3d": (_resnet3d, "classify", 3,
                 "3D ResNet (MONAI ResNet with basic blocks, BatchNorm, ReLU; small `widths`) classifier"),
    "unet3d": (_unet3d, "segment", 3,
               "3D U-Net (MONAI UNet: strided / transposed convolutions, BatchNorm, ReLU), one sigmoid channel "
               "per region (TC/WT/ET)"),
    "unet3d_interp": (_unet3d_interp, "segment", 3,
                      "3D U-Net with max-pooling and trilinear upsampling + convolution (no strided or transposed "
                      "convolutions: no checkerboard in input gradients), BatchNorm, ReLU, one sigmoid channel per "
                      "region (TC/WT/ET)"),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_MODELS)


def describe_model(name: str) -> str:
    """One line describing a zoo model."""
    return _MODELS[_check_name(name)][3]


def model_task(name: str) -> str:
    """What zoo model ``name`` does: ``"classify"`` or ``"segment"``."""
    return _MODELS[_check_name(name)][1]


def model_dims(name: str) -> int:
    """The spatial dimensions of zoo model ``name``'s input (2 or 3)."""
    return _MODELS[_check_name(name)][2]


def _check_name(name: str) -> str:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(_MODELS)}")
    return name


def build_model(name: str, **config) -> nn.Module:
    """Build zoo model ``name`` with keyword ``config`` (e.g. ``build_model("cnn2d", blocks=5)``).

    Unknown options raise a ``ValueError`` naming the accepted ones.
    """
    import inspect

    factory = _MODELS[_check_name(name)][0]
    accepted = list(inspect.signature(factory).parameters)
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} got unknown option(s) {unknown}; accepted: {accepted}")
    model = factory(**config)
    for key, value in config.items():
        if isinstance(value, tuple):
            config[key] = list(value)
    model.voxplain_config = {"model": name, "model_config": dict(config)}
    return model
