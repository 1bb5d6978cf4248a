"""Load a MONAI bundle folder offline: the network, its weights, and how the bundle says to run it.

A bundle folder holds ``configs/metadata.json``, ``configs/inference.json`` (or
``.yaml``/``.yml``) and ``models/model.pt``. :func:`load_bundle` builds the
config's ``network_def`` with ``monai.bundle.ConfigParser``, loads the weights
with ``torch.load(..., weights_only=True)`` and reads, into a plain
:class:`BundleDescription`:

* the sliding-window inferer (``inferer``: ``SlidingWindowInferer``) with MONAI's
  defaults for every setting the config leaves out (overlap 0.25, constant
  blending, ...), ready as a :class:`voxplain.sliding_window.SlidingWindow`;
* the preprocessing transforms (``preprocessing``: a ``Compose``) as steps with
  resolved arguments, and what voxplain can take from them: orientation
  (``Orientation[d]``), voxel spacing (``Spacing[d]``), intensity normalisation
  (``NormalizeIntensity[d]``, ``ScaleIntensityRange[d]``, ...) and a size
  multiple (``DivisiblePad[d]``); steps voxplain does not know are listed in
  :attr:`BundleDescription.unsupported_steps` rather than silently dropped;
* the output activation (``Activations[d]`` in ``postprocessing``);
* channel and class names from ``metadata.json``'s ``network_data_format``
  (``channel_def``), and the size multiple of its ``spatial_shape`` (``"8*n"``).

Nothing is downloaded: only files in the folder are read.

**A bundle is code.** Its configs name arbitrary Python callables (``_target_``)
and expressions (``"$..."``) that ``monai.bundle`` imports and runs while the
bundle is read, exactly like loading a TorchScript file or unpickling a model.
Load only bundles you trust, from a path you typed; never load a bundle whose
path was read from a database, a sweep record or another config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BundleDescription", "BundleStep", "load_bundle", "is_bundle_folder", "BUNDLE_IS_CODE"]

#: one line for ``--help`` and the README
BUNDLE_IS_CODE = ("a MONAI bundle is code: its configs import and run arbitrary Python (_target_, $expressions) "
                  "when loaded, like TorchScript; load only bundles you trust")

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_SPECIAL_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")
_NO_OPS = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "CastToType", "AddChannel",
           "ToDevice", "ToNumpy", "Identity", "ConvertToMultiChannelBasedOnBratsClasses", "DeleteItems",
           "SelectItems", "CopyItems"}
_NORMALISATIONS = {"NormalizeIntensity", "ScaleIntensityRange", "ScaleIntensity", "ScaleIntensityRangePercentiles"}
_INFERER_SETTINGS = ("roi_size", "overlap", "mode", "sigma_scale", "sw_batch_size", "padding_mode", "cval")


@dataclass(frozen=True)
class BundleStep:
    """One preprocessing transform of the bundle: its class name (dictionary ``d`` suffix removed) and arguments."""

    name: str
    args: dict[str, Any]


@dataclass
class BundleDescription:
    """A loaded bundle: the network with its weights, and how the bundle runs it.

    Attributes:
        path: the bundle folder.
        network: the ``network_def`` module with ``models/model.pt`` loaded, in eval mode.
        name, version, task: from ``metadata.json`` (None when absent).
        channel_names: input channel names (``channel_def`` of the first input), or None.
        class_names: output channel names (``channel_def`` of the first output), or None.
        output_activation: ``"sigmoid"``, ``"softmax"`` or None (from ``postprocessing``).
        sliding_window: the inferer settings (``roi_size``, ``overlap``, ``mode``,
            ``sigma_scale``, ``sw_batch_size``, ``padding_mode``, ``cval``), or None
            when the bundle does not use a ``SlidingWindowInferer``.
        preprocessing: the recognised and unrecognised transforms, in order.
        orientation: axis codes from ``Orientation`` (e.g. ``"RAS"``), or None.
        spacing: voxel size in mm from ``Spacing``, or None.
        spacing_mode: the interpolation ``Spacing`` uses (e.g. ``"bilinear"``), or None.
        normalisation: the intensity step (a :class:`BundleStep`), or None.
        pad_multiple: the size multiple from ``DivisiblePad`` or metadata (``"8*n"``), or None.
        unsupported_steps: transform names voxplain cannot reproduce; the caller
            should refuse or warn rather than explain a differently preprocessed scan.
    """

    path: Path
    network: nn.Module
    name: str | None = None
    version: str | None = None
    task: str | None = None
    channel_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    output_activation: str | None = None
    sliding_window: dict[str, Any] | None = None
    preprocessing: tuple[BundleStep, ...] = ()
    orientation: str | None = None
    spacing: tuple[float, ...] | None = None
    spacing_mode: str | None = None
    normalisation: BundleStep | None = None
    pad_multiple: int | None = None
    unsupported_steps: tuple[str, ...] = field(default_factory=tuple)

    def sliding_window_inferer(self):
        """The bundle's inferer as a :class:`voxplain.sliding_window.SlidingWindow` (None without one)."""
        if self.sliding_window is None:
            return None
        from ..sliding_window import SlidingWindow

        return SlidingWindow(**self.sliding_window)


def is_bundle_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with ``configs/`` holding an inference config."""
    path = Path(path)
    return path.is_dir() and any((path / "configs" / n).is_file() for n in _CONFIG_NAMES)


def load_bundle(path: str | os.PathLike, weights: str | os.PathLike | None = None,
                network_key: str = "network_def") -> BundleDescription:
    """Build a bundle's network, load its weights and read how it is run (see the module docstring).

    Args:
        path: the bundle folder (a path the user gave; a bundle is code).
        weights: the weights file (default ``models/model.pt``): a state dict, or a
            dict holding one under ``"model"``/``"state_dict"``/``"network"``; read with
            ``weights_only=True``.
        network_key: the config entry that defines the network.

    Raises ``FileNotFoundError`` for missing files and ``ValueError`` for configs or
    weights that do not fit, naming the file.
    """
    from monai.bundle import ConfigParser

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"MONAI bundle folder not found: {folder}")
    config_file = next((folder / "configs" / n for n in _CONFIG_NAMES if (folder / "configs" / n).is_file()), None)
    if config_file is None:
        raise FileNotFoundError(f"{folder} is not a MONAI bundle: expected configs/inference.json (or .yaml)")
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
        meta_file = folder / "configs" / "metadata.json"
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
    except Exception as err:  # noqa: BLE001 - JSON/YAML errors of any library
        raise ValueError(f"cannot read the bundle config {config_file}: {_one_line(err)}") from None
    parser["bundle_root"] = str(folder)
    if network_key not in parser.get():
        raise ValueError(f"{config_file} has no {network_key!r} entry defining the network")
    try:
        network = parser.get_parsed_content(network_key)
    except Exception as err:  # noqa: BLE001 - any error building the user's network
        raise ValueError(f"cannot build {network_key!r} of {config_file}: {_one_line(err)}") from None
    if not isinstance(network, nn.Module):
        raise ValueError(f"{network_key!r} of {config_file} built a {type(network).__name__}, not a torch module")
    _load_weights(network, Path(weights) if weights is not None else folder / "models" / "model.pt")
    network.eval()

    meta = parser.get(ConfigParser.meta_key) or {}
    description = BundleDescription(path=folder, network=network, name=meta.get("name"),
                                    version=meta.get("version"), task=meta.get("task"))
    _read_metadata(description, meta)
    description.sliding_window = _read_inferer(parser)
    _read_preprocessing(description, parser)
    description.output_activation = _read_activation(parser)
    return description


def _load_weights(network: nn.Module, file: Path) -> None:
    if file.suffix == ".ts":
        raise ValueError(f"{file} is TorchScript; load it as a TorchScript model, not through the bundle's config")
    if not file.is_file():
        raise FileNotFoundError(f"bundle weights not found: {file} (models/model.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors of many kinds
        raise ValueError(f"cannot read bundle weights {file} as a plain state dict (weights_only=True): "
                         f"{_one_line(err)}") from None
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights in {file} do not fit the bundle's network: {_one_line(err)}") from None


def _read_metadata(description: BundleDescription, meta: Mapping) -> None:
    formats = meta.get("network_data_format") or {}
    inputs = list((formats.get("inputs") or {}).values())
    outputs = list((formats.get("outputs") or {}).values())
    if inputs:
        description.channel_names = _channel_names(inputs[0])
        description.pad_multiple = _multiple(inputs[0].get("spatial_shape"))
    if outputs:
        description.class_names = _channel_names(outputs[0])


def _channel_names(entry: Mapping) -> tuple[str, ...] | None:
    defs = entry.get("channel_def")
    if not isinstance(defs, Mapping) or not defs:
        return None
    try:
        order = sorted(defs, key=int)
    except (TypeError, ValueError):
        return None
    if [int(k) for k in order] != list(range(len(order))):
        return None
    return tuple(str(defs[k]) for k in order)


def _multiple(spatial_shape) -> int | None:
    """The size multiple of a metadata ``spatial_shape`` like ``["8*n", "8*n", "8*n"]``."""
    if not isinstance(spatial_shape, (list, tuple)) or not spatial_shape:
        return None
    found = set()
    for entry in spatial_shape:
        m = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(entry))
        if m is None:
            return None
        found.add(int(m.group(1)))
    return max(found)


def _read_inferer(parser) -> dict[str, Any] | None:
    raw = parser.get("inferer")
    if not isinstance(raw, Mapping) or _class_name(raw.get("_target_")) != "SlidingWindowInferer":
        return None
    from monai.inferers import SlidingWindowInferer

    try:
        inferer = parser.get_parsed_content("inferer")
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot read the bundle's sliding-window inferer: {_one_line(err)}") from None
    if not isinstance(inferer, SlidingWindowInferer):
        return None
    settings = {k: getattr(inferer, k) for k in _INFERER_SETTINGS}
    settings["roi_size"] = tuple(int(n) for n in settings["roi_size"]) if not isinstance(settings["roi_size"], int) \
        else settings["roi_size"]
    for key in ("mode", "padding_mode"):
        settings[key] = str(getattr(settings[key], "value", settings[key]))
    return settings


def _transform_ids(parser) -> list[str]:
    """Config ids of the preprocessing transforms, following one reference for the list."""
    raw = parser.get("preprocessing")
    if not isinstance(raw, Mapping):
        return []
    base = "preprocessing::transforms"
    transforms = raw.get("transforms")
    if isinstance(transforms, str) and transforms.startswith("@"):
        base = transforms[1:].replace("#", "::")
        transforms = parser.get(base)
    if not isinstance(transforms, list):
        return []
    return [f"{base}::{i}" for i in range(len(transforms))]


def _read_preprocessing(description: BundleDescription, parser) -> None:
    raw = parser.get("preprocessing")
    ids = _transform_ids(parser)
    if raw is not None and not ids:
        description.unsupported_steps = ("preprocessing (not a Compose with a list of transforms)",)
        return
    steps, unsupported = [], []
    for tid in ids:
        item = parser.get(tid)
        if not isinstance(item, Mapping) or "_target_" not in item:
            unsupported.append(str(item)[:60])
            continue
        if item.get("_disabled_") in (True, "true", "True"):
            continue
        name = _class_name(item["_target_"])
        args = {}
        for key in item:
            if key in _SPECIAL_KEYS:
                continue
            try:
                args[key] = _plain(parser.get_parsed_content(f"{tid}::{key}"))
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"cannot resolve {key!r} of preprocessing step {name}: {_one_line(err)}") from None
        step = BundleStep(name, args)
        steps.append(step)
        if name in _NO_OPS:
            continue
        if name == "Orientation":
            description.orientation = "".join(args.get("axcodes", "")) or None
        elif name == "Spacing":
            pixdim = args.get("pixdim")
            description.spacing = tuple(float(p) for p in pixdim) if isinstance(pixdim, (list, tuple)) \
                else (float(pixdim),) * 3
            mode = args.get("mode")
            description.spacing_mode = str(mode[0] if isinstance(mode, (list, tuple)) else mode) if mode else None
        elif name in _NORMALISATIONS:
            description.normalisation = step
        elif name == "DivisiblePad":
            k = args.get("k")
            description.pad_multiple = int(max(k) if isinstance(k, (list, tuple)) else k)
        else:
            unsupported.append(name)
    description.preprocessing = tuple(steps)
    description.unsupported_steps = tuple(unsupported)


def _read_activation(parser) -> str | None:
    raw = parser.get("postprocessing")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("transforms"), list):
        return None
    for item in raw["transforms"]:
        if isinstance(item, Mapping) and _class_name(item.get("_target_")) == "Activations":
            for activation in ("sigmoid", "softmax"):
                if item.get(activation) in (True, "true", "True"):
                    return activation
    return None


def _class_name(target) -> str:
    """``"monai.transforms.Spacingd"`` -> ``"Spacing"`` (the dictionary variant is the same step)."""
    name = str(target or "").lstrip("$").split(".")[-1]
    if name[-1:] in ("d", "D") and name[:-1] in _KNOWN:
        name = name[:-1]
    return name


_KNOWN = _NO_OPS | _NORMALISATIONS | {"Orientation", "Spacing", "DivisiblePad", "Activations", "AsDiscrete",
                                      "CropForeground", "SpatialPad", "Resize", "SpatialCrop", "CenterSpatialCrop",
                                      "ScaleIntensityRangePercentiles", "Lambda", "Invert", "SaveImage"}


def _plain(value):
    """Config values as plain Python (tuples for sequences, enums by value)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int, float)):
        return value.value
    return value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
