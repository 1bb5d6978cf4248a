"""Bring a scan to the grid, intensities, channel order and size a model expects, and maps back.

A model was trained on scans of one voxel spacing and orientation, normalised one
way, with its channels in one order, at sizes its architecture accepts. A user's
scan is none of these. :class:`ModelGrid` gathers what the model expects (from a
voxplain checkpoint's ``config.json``, a MONAI bundle, or the command line) and
:func:`prepare_case` applies it to a :class:`~voxplain.report.inputs.Case`, in the
order MONAI's bundles apply their transforms:

1. channels reordered to the model's channel names (a bundle's ``channel_def``;
   BraTS modality names and their aliases are recognised);
2. reoriented and resampled to the model's voxel spacing
   (:func:`voxplain.data.resample.resample_to_spacing`: linear for the image,
   nearest neighbour for the ground-truth labels);
3. normalised: voxplain's z-score per modality over non-zero voxels, or the
   bundle's own intensity transform (run by MONAI);
4. cropped or padded: to the checkpoint's ``input_size`` around the brain, else
   padded symmetrically to the size multiple the network needs
   (:func:`voxplain.models.input_size.input_size_rule`); with a sliding window,
   not at all (the windows cover the scan, padding themselves where it is smaller).

:class:`Prepared` keeps the way back: ``to_scan`` puts a map made on the model's
grid on the scan's own grid (crop undone, then linear interpolation back to the
source voxels, and a per-channel map's channels back in the scan's order),
``labels_to_scan`` does the same for label maps with nearest neighbour, so every
NIfTI written has the source scan's shape and affine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ModelGrid", "Prepared", "model_grid", "prepare_case", "reorder_channels", "canonical_channel"]


@dataclass
class ModelGrid:
    """What a model expects of a scan.

    Attributes:
        spacing: voxel size in mm per axis of the reoriented grid, or None (the scan's own).
        orientation: axis codes such as ``"RAS"``, or None (the scan's own).
        normalisation: a bundle's intensity step (:class:`~voxplain.models.bundle.BundleStep`),
            or None for voxplain's z-score per modality over non-zero voxels.
        channel_names: the input channels in the model's order (a bundle's), or None.
        input_size: the checkpoint's fixed crop (voxels), or None.
        pad_multiple: force the size multiple (``--pad-multiple``), or None to find it.
        sliding_window: the :class:`~voxplain.sliding_window.SlidingWindow` the model is applied with, or None.
        source: where each setting came from, for the report (e.g. ``{"spacing": "config.json"}``).
    """

    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    normalisation: Any = None
    channel_names: tuple[str, ...] | None = None
    input_size: tuple[int, ...] | None = None
    pad_multiple: int | tuple[int, ...] | None = None
    sliding_window: Any = None
    source: dict[str, str] = field(default_factory=dict)


def model_grid(config: dict | None = None, bundle=None, spacing=None, pad_multiple=None,
               sliding_window=None) -> ModelGrid:
    """The :class:`ModelGrid` of a checkpoint ``config`` or a MONAI ``bundle``, with the command's overrides.

    ``spacing`` (``--spacing``) overrides any recorded spacing; ``sliding_window``
    (``--roi``) overrides a bundle's inferer; ``pad_multiple`` (``--pad-multiple``) the
    multiple found for the network. A bundle's unsupported preprocessing steps are
    refused by name: explaining a scan preprocessed differently from the model's
    training data would explain the wrong input.
    """
    from ..data.resample import _spacing, grid_from_config
    from ..sliding_window import as_sliding_window

    grid = ModelGrid(pad_multiple=pad_multiple, sliding_window=as_sliding_window(sliding_window))
    if sliding_window is not None:
        grid.source["sliding_window"] = "command line"
    if bundle is not None:
        if bundle.unsupported_steps:
            raise ValueError(f"the bundle {bundle.path} preprocesses with step(s) voxplain cannot reproduce: "
                             f"{', '.join(bundle.unsupported_steps)}; only orientation, spacing, intensity "
                             "normalisation and divisible padding are applied, so its maps would explain a "
                             "differently preprocessed scan")
        grid.spacing, grid.orientation = bundle.spacing, bundle.orientation
        grid.normalisation, grid.channel_names = bundle.normalisation, bundle.channel_names
        if grid.pad_multiple is None and bundle.pad_multiple is not None:
            grid.pad_multiple = int(bundle.pad_multiple)
        if grid.sliding_window is None and bundle.sliding_window is not None:
            grid.sliding_window = bundle.sliding_window_inferer()
            grid.source["sliding_window"] = "bundle inferer"
        for key in ("spacing", "orientation", "normalisation", "channel_names"):
            if getattr(grid, key) is not None:
                grid.source[key] = "bundle"
    elif config:
        grid.spacing, grid.orientation = grid_from_config(config)
        grid.input_size = tuple(int(n) for n in config["input_size"]) if config.get("input_size") else None
        for key in ("spacing", "orientation"):
            if getattr(grid, key) is not None:
                grid.source[key] = "config.json"
    if spacing is not None:
        grid.spacing = _spacing(spacing)
        grid.source["spacing"] = "command line"
        if grid.orientation is None:
            grid.orientation = "RAS"
            grid.source["orientation"] = "RAS (voxplain's arrays)"
    return grid


@dataclass
class Prepared:
    """A case made ready for the model: ``x`` (1, C, *spatial) and the way back to the scan's grid.

    ``to_scan`` takes a map (C, *model spatial) to the scan's RAS grid (None: the model saw
    the scan's grid as is); ``labels_to_scan`` takes a label map (*model spatial) there without
    mixing labels; ``seg`` is the case's ground truth on the model's grid (nearest neighbour);
    ``spacing`` the model grid's voxel size.
    """

    x: torch.Tensor
    to_scan: Callable[[np.ndarray], np.ndarray] | None
    notes: dict[str, Any]
    seg: np.ndarray | None = None
    labels_to_scan: Callable[[np.ndarray], np.ndarray] | None = None
    spacing: tuple[float, ...] | None = None


_TOKEN = re.compile(r"[^a-z0-9]+")


def canonical_channel(name: str) -> str | None:
    """The BraTS modality (t1, t1ce, t2, flair) a channel name stands for, else None.

    Knows the BraTS file suffixes and their aliases (``T1c``, ``t1gd``, ``t2f``, ...), a
    name's last word (``BraTS20_001_flair``) and free-text series descriptions
    ("AX T1 POST GAD").
    """
    from ..data.brats import ALIASES, MODALITIES
    from ..data.dicom import modality_from_description

    text = str(name).strip().lower()
    for candidate in (text, *reversed(_TOKEN.split(text))):
        if ALIASES.get(candidate) in MODALITIES:
            return ALIASES[candidate]
    return modality_from_description(text)


def reorder_channels(image: np.ndarray, have: Sequence[str], want: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """``image`` (C, ...) with its channels (named ``have``) put in the order ``want`` names them.

    Names are matched exactly (case-insensitively), else as BraTS modalities
    (:func:`canonical_channel`). Returns the image and the source index of each
    output channel; a clear error when a wanted channel is missing or ambiguous.
    """
    if len(have) != image.shape[0]:
        raise ValueError(f"{len(have)} channel names for an image with {image.shape[0]} channels")
    if len(want) != len(have):
        raise ValueError(f"the model expects {len(want)} input channels ({', '.join(want)}), the scan has "
                         f"{len(have)} ({', '.join(have)})")
    lower = [str(h).lower() for h in have]
    canon = [canonical_channel(h) for h in have]
    order = []
    for w in want:
        if str(w).lower() in lower and lower.count(str(w).lower()) == 1:
            order.append(lower.index(str(w).lower()))
            continue
        c = canonical_channel(w)
        hits = [i for i, k in enumerate(canon) if c is not None and k == c]
        if len(hits) != 1:
            raise ValueError(f"cannot find the model's input channel {w!r} among the scan's channels "
                             f"({', '.join(have)}): {'none' if not hits else 'several'} match; name the files after "
                             "the modalities (t1, t1ce, t2, flair)")
        order.append(hits[0])
    if sorted(order) != list(range(len(have))):
        raise ValueError(f"the scan's channels ({', '.join(have)}) do not map one to one onto the model's "
                         f"({', '.join(want)})")
    return np.ascontiguousarray(image[order]), order


def _normalise(image: np.ndarray, step) -> tuple[np.ndarray, str]:
    """Voxplain's z-score (``step`` None) or a bundle's intensity transform, run by MONAI itself."""
    from ..data.preprocess import zscore_nonzero

    if step is None:
        return zscore_nonzero(image), "z-score per channel over non-zero voxels"
    import monai.transforms as mt

    args = {k: v for k, v in step.args.items() if k not in ("keys", "allow_missing_keys")}
    out = getattr(mt, step.name)(**args)(torch.from_numpy(np.ascontiguousarray(image)))
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return np.asarray(out, dtype=np.float32), f"bundle: {step.name}({', '.join(f'{k}={v}' for k, v in args.items())})"


def _compose(*steps: Callable | None) -> Callable | None:
    steps = [s for s in steps if s is not None]
    if not steps:
        return None

    def apply(array):
        for s in steps:
            array = s(array)
        return array
    return apply


def _check_channels(model: nn.Module, case) -> None:
    """A clear error, before any probing, when the model's first convolution takes another number of channels."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != case.image.shape[0]:
        raise ValueError(f"the model's first convolution expects {first.in_channels} channel(s), the scan has "
                         f"{case.image.shape[0]} ({', '.join(case.channels)})")


def _check_window(model: nn.Module, grid: ModelGrid, channels: int, spatial: tuple[int, ...]) -> None:
    """Refuse a window size the network cannot run on (a size multiple it breaks, a fixed size it differs from)."""
    from ..models.input_size import input_size_rule

    roi = grid.sliding_window.plan(spatial).roi_size
    rule = input_size_rule(model, spatial_dims=len(spatial), in_channels=channels, pad_multiple=grid.pad_multiple)
    if rule.fixed_size is not None and tuple(rule.fixed_size) != tuple(roi):
        raise ValueError(f"the window size {roi} is not the size the model accepts, {rule.fixed_size} "
                         f"({rule.detail}); use --roi {','.join(map(str, rule.fixed_size))}")
    if rule.fixed_size is None and rule.padded_size(roi) != tuple(roi):
        raise ValueError(f"the window size {roi} is not a multiple of {rule.multiple}, which the model needs "
                         f"({rule.source}: {rule.detail}); choose --roi as a multiple of it")


def prepare_case(case, model: nn.Module, config: dict | None = None, normalise: bool = True,
                 size: Sequence[int] | None = None, centre: Sequence[float] | None = None,
                 grid: ModelGrid | None = None) -> Prepared:
    """Bring ``case`` to what ``model`` expects (see the module docstring) and remember the way back.

    Volumes: channels ordered, resampled, normalised (``normalise``), then cropped/padded
    to ``size`` (default the checkpoint's ``input_size``; voxels of the model's grid) around
    ``centre`` (voxel coordinates of the scan; default the brain's centre), or padded to the
    network's size multiple. 2D images: values as
    read; resized to the checkpoint's ``input_size`` if it has one.
    """
    from ..data.preprocess import crop_or_pad, foreground_centre

    config = config or {}
    grid = grid if grid is not None else model_grid(config)
    image, seg, notes = case.image, case.seg, {}
    to_scan = labels_to_scan = None
    spacing = tuple(case.spacing)
    if not case.is_volume:
        size = size if size is not None else config.get("input_size")
        if size is not None and len(size) == 2 and tuple(size) != tuple(image.shape[1:]):
            from skimage.transform import resize

            image = resize(image, (image.shape[0], *size), order=1, preserve_range=True, anti_aliasing=True)
            notes["resized_to"] = list(size)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return Prepared(x, None, notes, spacing=spacing)

    _check_channels(model, case)
    back_to_scan_order = None
    if grid.channel_names is not None:
        image, order = reorder_channels(image, case.channels, grid.channel_names)
        if order != list(range(len(order))):
            notes["channels"] = {"model": list(grid.channel_names), "from_scan": [case.channels[i] for i in order],
                                 "maps_written_in": "the scan's channel order"}
            inverse = np.argsort(order)
            back_to_scan_order = (lambda a: a[inverse] if a.shape[0] == len(inverse) else a)
    if (grid.spacing is not None or grid.orientation is not None) and case.meta is not None:
        from ..data.resample import resample_to_spacing

        resampled, affine, mapping = resample_to_spacing(image, case.meta.ras_affine, grid.spacing,
                                                         grid.orientation or None, kind="map")
        if not mapping.is_identity:
            if centre is not None:  # the scan's voxel coordinates -> the model grid's, through the world
                world = case.meta.ras_affine @ np.append(np.asarray(centre, float), 1.0)
                centre = tuple((np.linalg.inv(affine) @ world)[:3])
            image = resampled
            seg = None if seg is None else mapping.to_target(seg, kind="label")
            to_scan = (lambda a: mapping.to_source(a, kind="map"))
            labels_to_scan = (lambda a: mapping.to_source(a, kind="label"))
            spacing = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
            notes["resampled"] = {"from_shape": list(mapping.source_shape), "to_shape": list(mapping.target_shape),
                                  "spacing_mm": [round(s, 4) for s in spacing],
                                  "orientation": grid.orientation, "image": "linear", "labels": "nearest",
                                  "maps_back": "linear onto the scan's grid (labels: nearest)",
                                  "from": grid.source.get("spacing", grid.source.get("orientation"))}
    raw = image
    if normalise:
        image, how = _normalise(image, grid.normalisation)
        notes["normalise"] = how
    box = None
    size = size if size is not None else (grid.input_size if grid.sliding_window is None else None)
    spatial = tuple(image.shape[1:])
    if size is not None and len(size) == 3:
        # the centre of the raw scan's foreground, as the training datasets crop
        centre = centre if centre is not None else foreground_centre(raw)
        image, box = crop_or_pad(image, size, centre=centre, return_box=True)
        notes["crop_or_pad"] = list(size)
    elif grid.sliding_window is None:
        from ..models.input_size import input_size_rule

        rule = input_size_rule(model, spatial_dims=3, in_channels=image.shape[0], pad_multiple=grid.pad_multiple)
        padded, box = rule.pad(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])
        image = padded[0].numpy()
        if tuple(box.size) != spatial:
            notes["pad_to_multiple_of"] = list(rule.multiple)
            notes["size_rule"] = f"{rule.source}: {rule.detail}"
    else:
        _check_window(model, grid, image.shape[0], spatial)
        notes["sliding_window"] = grid.sliding_window.settings()
    if box is not None:
        seg = None if seg is None else box.apply(seg)
        if tuple(box.size) != tuple(box.source_shape) or any(box.start):
            to_scan = _compose(box.restore, to_scan)
            labels_to_scan = _compose(box.restore, labels_to_scan)
    to_scan = _compose(to_scan, back_to_scan_order)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    labels = None if seg is None else np.rint(np.asarray(seg)).astype(np.int16)
    return Prepared(x, to_scan, notes, labels, labels_to_scan, spacing)
