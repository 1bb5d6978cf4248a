"""Which spatial input sizes a network accepts, and padding a scan to one of them.

Encoder-decoder networks downsample by a total stride ``m`` and concatenate skip
connections, so they run only on sizes that are multiples of ``m`` (a 67 x 79 x 64
scan crashes MONAI's SegResNet: "The size of tensor a (18) must match the size of
tensor b (17)"). :func:`input_size_rule` finds that multiple for any model:

* ``pad_multiple`` given: taken as is (the user's override, e.g. ``--pad-multiple``).
* a MONAI network whose architecture fixes it (``UNet``, ``AttentionUnet`` and
  ``DynUNet``: the product of their strides, per axis; ``SegResNet``:
  ``2 ** (len(blocks_down) - 1)``; ``BasicUNet``: 16) or voxplain's own
  ``RegionUNet`` (pads itself: 1).
* any other model: probed. The model runs without gradient, in eval mode, on zero
  inputs of ``3 m`` voxels per axis for ``m = 1, 2, 4, ...`` up to ``max_multiple``;
  the first ``m`` at which it returns an output of the input's spatial size (or a
  classification output (N, K)) is the multiple; then each axis is lowered on
  its own while that still works (anisotropic strides). An odd multiple ``3 m``
  is the hardest size for ``m`` (not divisible by ``2 m``), and 3 rather than 1
  keeps the coarsest level above one voxel (instance norm refuses a single voxel).

Networks with a **fixed input size** (MONAI ``UNETR`` and other ViT-based nets:
their position embeddings fix ``img_size``) accept no multiple. For them the rule
says so (:attr:`InputSizeRule.fixed_size`) and :meth:`InputSizeRule.pad` refuses a
scan of another size instead of padding it: explain such a model with a sliding
window of its size (``roi_size = img_size``,
:class:`voxplain.sliding_window.SlidingWindow`), or resize the scan.

Padding is **symmetric** (``diff // 2`` before, the rest after; MONAI's
``DivisiblePad`` and ``sliding_window_inference`` pad the same way) so the subject
stays centred and the border a network sees is split between both sides; the pad
value is 0, which in z-scored space (voxplain's :func:`~voxplain.data.preprocess.zscore_nonzero`
keeps the background at 0) is the background. :meth:`InputSizeRule.pad` returns
the :class:`~voxplain.data.preprocess.CropBox` whose ``restore`` crops any map on
the padded grid back to the scan's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.preprocess import CropBox, crop_box

__all__ = ["InputSizeRule", "input_size_rule", "architecture_rule", "probe_input_multiple"]


@dataclass(frozen=True)
class InputSizeRule:
    """The spatial sizes a model accepts.

    Attributes:
        multiple: per spatial axis, the number the size must be a multiple of
            (None for a fixed-size model).
        fixed_size: the only size a fixed-size model accepts (None otherwise).
        source: how it was found: ``"override"``, ``"architecture"`` or ``"probe"``.
        detail: a short human-readable reason (for logs and reports).
    """

    multiple: tuple[int, ...] | None
    fixed_size: tuple[int, ...] | None = None
    source: str = "probe"
    detail: str = ""

    def padded_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The smallest accepted size at least ``spatial`` (error for a fixed-size model of another size)."""
        spatial = tuple(int(n) for n in spatial)
        if self.fixed_size is not None:
            if spatial != self.fixed_size:
                raise ValueError(
                    f"the model accepts only inputs of spatial size {self.fixed_size} ({self.detail}), got "
                    f"{spatial}; explain it with a sliding window of that size (roi_size={self.fixed_size}, "
                    f"--roi {','.join(map(str, self.fixed_size))}) or resize the scan to it")
            return spatial
        multiple = self.multiple if len(self.multiple) == len(spatial) else (self.multiple[0],) * len(spatial)
        return tuple(m * math.ceil(n / m) for n, m in zip(spatial, multiple))

    def pad(self, x: Tensor, fill: float = 0.0) -> tuple[Tensor, CropBox]:
        """Pad the spatial axes of ``x`` (N, C, *spatial) symmetrically with ``fill`` to an accepted size.

        Returns the padded tensor and the :class:`CropBox`; ``box.restore(map)`` crops a
        map computed on the padded grid back to ``x``'s spatial shape.
        """
        spatial = tuple(x.shape[2:])
        box = crop_box(spatial, self.padded_size(spatial))
        return (x if box.size == spatial else box.apply(x, fill)), box


_MONAI_ARCHITECTURES = ("UNet", "AttentionUnet", "DynUNet", "SegResNet", "BasicUNet", "UNETR")


def architecture_rule(model: nn.Module, spatial_dims: int = 3) -> InputSizeRule | None:
    """The rule read from a known architecture's configuration, or None for other models."""
    from .unet import RegionUNet

    if isinstance(model, RegionUNet):
        return InputSizeRule((1,) * spatial_dims, source="architecture", detail="RegionUNet pads itself")
    try:
        from monai.networks import nets
    except ImportError:  # pragma: no cover - MONAI is a dependency
        return None
    name = next((n for n in _MONAI_ARCHITECTURES if isinstance(model, getattr(nets, n, ()))), None)
    if name in ("UNet", "AttentionUnet", "DynUNet"):
        multiple = [1] * spatial_dims
        for stride in model.strides:
            per_axis = (int(stride),) * spatial_dims if isinstance(stride, int) else tuple(int(s) for s in stride)
            multiple = [m * s for m, s in zip(multiple, per_axis)]
        return InputSizeRule(tuple(multiple), source="architecture", detail=f"MONAI {name} strides {model.strides}")
    if name == "SegResNet":
        m = 2 ** (len(model.blocks_down) - 1)
        return InputSizeRule((m,) * spatial_dims, source="architecture",
                             detail=f"MONAI SegResNet with {len(model.blocks_down)} levels")
    if name == "BasicUNet":
        return InputSizeRule((16,) * spatial_dims, source="architecture", detail="MONAI BasicUNet (4 poolings)")
    if name == "UNETR":
        size = tuple(int(p) * int(f) for p, f in zip(model.patch_size, model.feat_size))
        return InputSizeRule(None, fixed_size=size, source="architecture",
                             detail=f"MONAI UNETR: ViT position embeddings fix img_size={size}")
    return None


def input_size_rule(model: nn.Module, spatial_dims: int = 3, in_channels: int | None = None,
                    pad_multiple: int | Sequence[int] | None = None, max_multiple: int = 32,
                    fixed_size_hint: Sequence[int] | None = None) -> InputSizeRule:
    """The spatial sizes ``model`` accepts: the override, else its architecture, else a probe.

    Args:
        model: any network taking (N, C, *spatial); it comes back unchanged.
        spatial_dims: 1, 2 or 3.
        in_channels: input channels for probing (default: the first convolution's).
        pad_multiple: force the multiple (one int or one per axis).
        max_multiple: the largest multiple probed (inputs of ``3 * max_multiple`` voxels per axis).
        fixed_size_hint: a size to try when no multiple works (e.g. the checkpoint's
            recorded input size); if the model runs on it, it is the model's fixed size.

    Raises ``ValueError`` when nothing works, with what was tried and what failed.
    """
    if pad_multiple is not None:
        values = (pad_multiple,) * spatial_dims if not isinstance(pad_multiple, Sequence) else tuple(pad_multiple)
        if len(values) != spatial_dims or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                                              for v in values):
            raise ValueError(f"pad_multiple must be a positive int or one per spatial axis ({spatial_dims}), "
                             f"got {pad_multiple!r}")
        return InputSizeRule(tuple(int(v) for v in values), source="override", detail="given by the user")
    rule = architecture_rule(model, spatial_dims)
    if rule is not None:
        return rule
    return probe_input_multiple(model, spatial_dims, in_channels, max_multiple, fixed_size_hint)


def probe_input_multiple(model: nn.Module, spatial_dims: int = 3, in_channels: int | None = None,
                         max_multiple: int = 32, fixed_size_hint: Sequence[int] | None = None) -> InputSizeRule:
    """Find the size multiple by running ``model`` on small zero inputs (see the module docstring)."""
    if in_channels is None:
        in_channels = _first_conv_channels(model)
    failures: dict[tuple[int, ...], str] = {}

    def accepts(size: tuple[int, ...]) -> bool:
        if size not in failures:
            failures[size] = _run_probe(model, in_channels, size)
        return failures[size] == ""

    with _eval_mode(model):
        m = 1
        while m <= max_multiple and not accepts((3 * m,) * spatial_dims):
            m *= 2
        if m > max_multiple:
            if fixed_size_hint is not None and accepts(tuple(int(n) for n in fixed_size_hint)):
                size = tuple(int(n) for n in fixed_size_hint)
                return InputSizeRule(None, fixed_size=size, source="probe",
                                     detail=f"runs on its recorded input size {size} and on no multiple")
            tried = "; ".join(f"{s}: {why}" for s, why in failures.items())
            raise ValueError(
                f"could not find an input size the model accepts: it failed on zero inputs of every multiple up "
                f"to {max_multiple} ({tried}). A model with a fixed input size (e.g. a ViT/UNETR) needs a "
                "sliding window of that size (--roi D,H,W) or a resize; else give the multiple (--pad-multiple)")
        multiple = [m] * spatial_dims
        for axis in range(spatial_dims):
            while multiple[axis] > 1:
                size = [3 * m] * spatial_dims
                size[axis] = 3 * (multiple[axis] // 2)
                if not accepts(tuple(size)):
                    break
                multiple[axis] //= 2
    return InputSizeRule(tuple(multiple), source="probe",
                         detail=f"probed on zero inputs of sizes {sorted(failures)}")


def _run_probe(model: nn.Module, in_channels: int, size: tuple[int, ...]) -> str:
    """'' if the model maps a zero input of ``size`` to an output of that size (or to (N, K)), else why not."""
    device = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, in_channels) + size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means "not this size"
        return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        out = out[0]
    if not isinstance(out, Tensor):
        return f"returned {type(out).__name__}, not a tensor"
    if out.ndim == 2:  # a classifier: any size it runs on is fine
        return ""
    if tuple(out.shape[2:]) != size:
        return f"output spatial size {tuple(out.shape[2:])} differs from the input's"
    return ""


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    raise ValueError("cannot tell the model's input channels (no convolution found); give in_channels")


class _eval_mode:
    """Eval mode for the probe; every module's training flag restored afterwards, even on error."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag
