"""What score is explained: turn a model output into one scalar per input row.

A target is *bound* once to the model's output on the original input (this is
where "the predicted class" or "the predicted mask" is decided), and the bound
target then scores any batch of rows derived from that input (IG path points,
SmoothGrad samples, occluded copies), each row naming the original sample it
came from. Fixing the class and region at the original input is what keeps an
attribution path explaining the same decision all along the path.
"""

from __future__ import annotations

import copy
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "Target",
    "BoundTarget",
    "ClassTarget",
    "SegmentationTarget",
    "BratsRegionTarget",
    "as_target",
    "predicted_region",
    "freeze_region",
    "EmptyRegionError",
    "BRATS_LABELS",
]

OUTPUT_KINDS = ("logit", "probability")

#: BraTS label values that make up each evaluation region.
BRATS_LABELS: dict[str, tuple[int, ...]] = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}


class EmptyRegionError(ValueError):
    """The region a segmentation target pools over has no voxel (e.g. the model predicts none)."""


def _check_output_kind(output: str) -> str:
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    return output


def _per_sample_index(index, batch: int, num_classes: int, what: str) -> Tensor | None:
    """Validate a class index (int or one per sample) against the output's class count."""
    if index is None:
        return None
    if isinstance(index, Tensor):
        values = index.flatten().tolist()
    elif isinstance(index, Sequence) and not isinstance(index, str):
        values = list(index)
    else:
        values = [index]
    try:
        if any(isinstance(v, (bool, float)) for v in values):
            raise TypeError
        values = [operator.index(v) for v in values]
    except TypeError:
        raise TypeError(f"{what} index must be an int or a sequence of ints, got {index!r}") from None
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{what} index: expected 1 or {batch} indices (one per sample), got {len(values)}")
    for v in values:
        if not 0 <= v < num_classes:
            raise IndexError(
                f"{what} index {v} is out of range: the model output has {num_classes} "
                f"class channel(s), valid indices are 0..{num_classes - 1}"
            )
    return torch.tensor(values, dtype=torch.long)


class BoundTarget(ABC):
    """A target fixed to one input batch: scores rows derived from that batch."""

    #: class/channel index explained for each original sample, shape (B,)
    classes: Tensor

    @abstractmethod
    def score(self, output: Tensor, sample_index: Tensor) -> Tensor:
        """Return the explained score, shape (N,), for an output of N rows.

        ``sample_index[i]`` is the original sample that row ``i`` derives from.
        """

    def describe(self) -> dict:
        """A JSON-friendly description of what is explained."""
        return {"classes": self.classes.tolist()}

    @property
    def affine_in_output(self) -> bool:
        """True if the score is affine in the model's output (e.g. a logit averaged over a fixed
        region): its gradient with respect to the output is then the same for every output,
        which lets a sliding-window gradient skip the stitching pass."""
        return False


class Target(ABC):
    """Chooses the scalar score F(x) that an explanation method differentiates."""

    @abstractmethod
    def bind(self, output: Tensor) -> BoundTarget:
        """Check ``output`` (the model's output on the original batch) and fix the target to it."""

    @property
    def binds_from_shape(self) -> bool:
        """True if :meth:`bind` reads only the output's shape, not its values (an explicit class and
        no predicted region): any output of the original batch's shape then binds it the same way."""
        return False


def _activate(out: Tensor, output_kind: str, activation: str) -> Tensor:
    if output_kind == "logit":
        return out
    if activation == "sigmoid" or out.shape[1] == 1:
        return torch.sigmoid(out)
    return torch.softmax(out, dim=1)


# ---------------------------------------------------------------------------
# classification


class ClassTarget(Target):
    """Score of one class of a (B, K) classification output.

    Args:
        index: class to explain; an int, one int per sample, or ``None`` for the
            predicted class of each sample.
        output: ``"logit"`` (default) explains the raw output; ``"probability"``
            the softmax probability (sigmoid when K == 1 or ``activation="sigmoid"``).
        activation: ``"softmax"`` or ``"sigmoid"``, used with ``output="probability"``.
    """

    def __init__(self, index: Union[int, Sequence[int], Tensor, None] = None, output: str = "logit",
                 activation: str = "softmax"):
        self.index = index
        self.output = _check_output_kind(output)
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def __repr__(self) -> str:
        return f"ClassTarget(index={self.index!r}, output={self.output!r})"

    @property
    def binds_from_shape(self) -> bool:
        return self.index is not None

    def bind(self, output: Tensor) -> BoundTarget:
        if output.ndim != 2:
            raise ValueError(
                "ClassTarget expects a classification output of shape (B, K), got shape "
                f"{tuple(output.shape)}; for a (B, K, *spatial) segmentation output use SegmentationTarget"
            )
        b, k = output.shape
        classes = _per_sample_index(self.index, b, k, "class")
        if classes is None:
            if k == 1:
                classes = torch.zeros(b, dtype=torch.long)
            else:
                classes = output.detach().argmax(dim=1).cpu()
        return _BoundClass(classes, self.output, self.activation)


@dataclass
class _BoundClass(BoundTarget):
    classes: Tensor
    output: str
    activation: str
    # the class when every sample explains the same one: scored by one column, no index arithmetic
    _same_class: int | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = set(self.classes.tolist())
        self._same_class = values.pop() if len(values) == 1 else None

    def score(self, output: Tensor, sample_index: Tensor) -> Tensor:
        if output.ndim != 2:
            raise ValueError(f"expected a (N, K) output, got shape {tuple(output.shape)}")
        act = _activate(output, self.output, self.activation)
        if self._same_class is not None:
            return act[:, self._same_class]
        cls = self.classes.to(output.device)[sample_index.to(output.device)]
        return act.gather(1, cls[:, None])[:, 0]

    def describe(self) -> dict:
        return {"kind": "class", "classes": self.classes.tolist(), "output": self.output}

    @property
    def affine_in_output(self) -> bool:
        return self.output == "logit"


# ---------------------------------------------------------------------------
# segmentation


def _pool(channel: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``channel`` (N, *spatial) over space, or over ``mask`` (N, *spatial) when given."""
    flat = channel.flatten(1)
    if mask is None:
        return flat.mean(dim=1)
    m = mask.flatten(1).to(flat.dtype)
    return (flat * m).sum(dim=1) / m.sum(dim=1)


class _RegionMaskMixin:
    """Shared handling of the ``region`` option of segmentation-style targets."""

    region: Union[None, str, Tensor]

    @property
    def binds_from_shape(self) -> bool:
        """A predicted region (``region="predicted"``) reads the output's values; no region or a mask does not."""
        return not isinstance(self.region, str)

    def _resolve_region(self, output: Tensor, predicted: Callable[[], Tensor]) -> Tensor | None:
        """The pooling mask (B, *spatial) on the CPU, or None; ``predicted()`` makes the predicted mask."""
        b, spatial = output.shape[0], tuple(output.shape[2:])
        if self.region is None:
            return None
        if isinstance(self.region, str):
            if self.region != "predicted":
                raise ValueError(f"region must be None, 'predicted' or a mask, got {self.region!r}")
            mask = predicted()
        else:
            mask = torch.as_tensor(self.region)
            if mask.dtype != torch.bool:
                mask = mask != 0
            if tuple(mask.shape) == spatial:
                mask = mask.expand(b, *spatial)
            elif mask.ndim == len(spatial) + 2 and mask.shape[1] == 1:
                mask = mask[:, 0]
            if tuple(mask.shape) != (b, *spatial):
                raise ValueError(
                    f"region mask must have the output's spatial shape {spatial} (or (B, 1, *spatial)), "
                    f"got {tuple(torch.as_tensor(self.region).shape)}"
                )
        mask = mask.detach().cpu().clone()
        empty = [i for i in range(b) if not bool(mask[i].any())]
        if empty:
            raise EmptyRegionError(
                f"the region to pool over is empty for sample(s) {empty}; "
                "choose another class, region or mask"
            )
        return mask


def predicted_region(output: Tensor, index, activation: str = "softmax") -> Tensor:
    """The voxels a segmentation output predicts as class ``index``: bool (B, *spatial) on the CPU.

    ``activation="sigmoid"`` (independent region channels) or a single channel:
    where the channel's logit is positive (probability > 0.5); ``"softmax"``: where
    the class wins the argmax. ``index`` is an int or one int per sample.
    """
    if output.ndim < 3:
        raise ValueError(f"predicted_region expects a (B, K, *spatial) output, got {tuple(output.shape)}")
    out = output.detach()
    b, k = out.shape[:2]
    classes = _per_sample_index(index, b, k, "segmentation class")
    rows = torch.arange(b, device=out.device)
    if activation == "sigmoid" or k == 1:
        return (out[rows, classes.to(out.device)] > 0).cpu()
    return (out.argmax(dim=1) == classes.to(out.device).view(b, *([1] * (out.ndim - 2)))).cpu()


class SegmentationTarget(_RegionMaskMixin, Target):
    """Score of one class of a (B, K, *spatial) segmentation output, pooled over space.

    Following NeuroXAI, the class channel is reduced to a scalar by its mean over
    all voxels (global average pooling), or over a region only.

    Args:
        index: class channel to explain (int or one per sample).
        region: ``None`` (all voxels), ``"predicted"`` (voxels predicted as this class
            on the original input) or a mask of shape (*spatial), (B, *spatial) or (B, 1, *spatial).
        output: ``"logit"`` or ``"probability"``.
        activation: ``"softmax"`` (mutually exclusive classes) or ``"sigmoid"``
            (independent region channels, e.g. BraTS TC/WT/ET), for probabilities
            and for deciding the predicted region.
    """

    def __init__(self, index: Union[int, Sequence[int], Tensor], region: Union[None, str, Tensor] = None,
                 output: str = "logit", activation: str = "softmax"):
        if index is None:
            raise ValueError("SegmentationTarget needs a class index (the channel to explain)")
        self.index = index
        self.region = region
        self.output = _check_output_kind(output)
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def __repr__(self) -> str:
        region = self.region if self.region is None or isinstance(self.region, str) else "mask"
        return f"SegmentationTarget(index={self.index!r}, region={region!r}, output={self.output!r})"

    def bind(self, output: Tensor) -> BoundTarget:
        if output.ndim < 3:
            raise ValueError(
                "SegmentationTarget expects a segmentation output of shape (B, K, *spatial), got shape "
                f"{tuple(output.shape)}; for a (B, K) classification output use ClassTarget"
            )
        b, k = output.shape[:2]
        classes = _per_sample_index(self.index, b, k, "segmentation class")
        mask = self._resolve_region(output, lambda: predicted_region(output, classes, self.activation))
        return _BoundSegmentation(classes, mask, self.output, self.activation)


@dataclass
class _BoundSegmentation(BoundTarget):
    classes: Tensor
    mask: Tensor | None
    output: str
    activation: str

    def score(self, output: Tensor, sample_index: Tensor) -> Tensor:
        act = _activate(output, self.output, self.activation)
        idx = sample_index.to(output.device)
        cls = self.classes.to(output.device)[idx]
        channel = act[torch.arange(act.shape[0], device=act.device), cls]
        mask = None if self.mask is None else self.mask.to(output.device)[idx]
        return _pool(channel, mask)

    def describe(self) -> dict:
        return {"kind": "segmentation", "classes": self.classes.tolist(), "output": self.output,
                "region": None if self.mask is None else "mask",
                "region_voxels": None if self.mask is None else self.mask.flatten(1).sum(1).tolist()}

    @property
    def affine_in_output(self) -> bool:
        return self.output == "logit"


class BratsRegionTarget(_RegionMaskMixin, Target):
    """A BraTS evaluation region (ET, TC or WT) of a segmentation model.

    Two output layouts are common:

    * ``layout="regions"``: one sigmoid channel per region, in the order given by
      ``channels`` (MONAI's BraTS convention is ``("TC", "WT", "ET")``). The region's
      channel is pooled like :class:`SegmentationTarget` with a sigmoid activation.
    * ``layout="labels"``: one softmax channel per label, in the order given by
      ``channels`` as BraTS label values (default ``(0, 1, 2, 4)``). A region is a
      union of labels, so its score is the pooled *sum of the member labels'
      softmax probabilities* (the probability that a voxel belongs to the region);
      ``output`` must then be ``"probability"``.

    ``region`` restricts pooling as for :class:`SegmentationTarget`; ``"predicted"``
    means the voxels predicted to lie in the region on the original input.
    """

    def __init__(self, name: str, layout: str = "regions", channels: Sequence | None = None,
                 region: Union[None, str, Tensor] = None, output: str | None = None):
        name = name.upper()
        if name not in BRATS_LABELS:
            raise ValueError(f"BraTS region must be one of {tuple(BRATS_LABELS)}, got {name!r}")
        if layout not in ("regions", "labels"):
            raise ValueError(f"layout must be 'regions' or 'labels', got {layout!r}")
        self.name, self.layout, self.region = name, layout, region
        if layout == "regions":
            self.channels = tuple(c.upper() for c in (channels or ("TC", "WT", "ET")))
            if sorted(self.channels) != sorted(BRATS_LABELS):
                raise ValueError(f"region channels must name ET, TC and WT once each, got {self.channels}")
            self.output = _check_output_kind(output or "logit")
        else:
            self.channels = tuple(int(c) for c in (channels or (0, 1, 2, 4)))
            missing = [v for v in BRATS_LABELS[name] if v not in self.channels]
            if missing:
                raise ValueError(f"label channels {self.channels} lack label(s) {missing} needed for {name}")
            self.output = _check_output_kind(output or "probability")
            if self.output != "probability":
                raise ValueError("with layout='labels' a region score is a sum of probabilities: "
                                 "use output='probability'")

    def __repr__(self) -> str:
        return f"BratsRegionTarget({self.name!r}, layout={self.layout!r})"

    def bind(self, output: Tensor) -> BoundTarget:
        if output.ndim < 3 or output.shape[1] != len(self.channels):
            raise ValueError(
                f"BratsRegionTarget({self.name!r}, layout={self.layout!r}) expects an output of shape "
                f"(B, {len(self.channels)}, *spatial) with channels {self.channels}, got {tuple(output.shape)}"
            )
        b = output.shape[0]
        out = output.detach()
        if self.layout == "regions":
            members = [self.channels.index(self.name)]
        else:
            members = [self.channels.index(v) for v in BRATS_LABELS[self.name]]

        def predicted() -> Tensor:
            if self.layout == "regions":
                return (out[:, members[0]] > 0).cpu()
            labels = out.argmax(dim=1)
            region = torch.zeros_like(labels, dtype=torch.bool)
            for m in members:
                region |= labels == m
            return region.cpu()

        mask = self._resolve_region(output, predicted)
        return _BoundBratsRegion(torch.full((b,), members[0], dtype=torch.long), tuple(members), mask,
                                 self.layout, self.output, self.name)


@dataclass
class _BoundBratsRegion(BoundTarget):
    classes: Tensor
    members: tuple[int, ...]
    mask: Tensor | None
    layout: str
    output: str
    name: str

    def score(self, output: Tensor, sample_index: Tensor) -> Tensor:
        if self.layout == "regions":
            ch = output[:, self.members[0]]
            if self.output == "probability":
                ch = torch.sigmoid(ch)
        else:
            ch = torch.softmax(output, dim=1)[:, list(self.members)].sum(dim=1)
        mask = None if self.mask is None else self.mask.to(output.device)[sample_index.to(output.device)]
        return _pool(ch, mask)

    def describe(self) -> dict:
        return {"kind": "brats_region", "region_name": self.name, "layout": self.layout,
                "channels": list(self.members), "output": self.output}

    @property
    def affine_in_output(self) -> bool:
        return self.layout == "regions" and self.output == "logit"


def freeze_region(target: Target, output: Tensor) -> Target:
    """``target`` with a ``region="predicted"`` replaced by the mask it predicts on ``output``.

    A predicted region is decided by the model; checks that change the model (parameter
    randomisation) must keep explaining the same voxels, so they take the frozen mask.
    Other targets come back unchanged.
    """
    if not isinstance(target, _RegionMaskMixin) or not isinstance(target.region, str):
        return target
    mask = target.bind(output).mask
    frozen = copy.copy(target)
    frozen.region = mask
    return frozen


def as_target(target) -> Target:
    """Normalise what users pass as ``target``: a Target, an int (a class), or None (predicted class)."""
    if isinstance(target, Target):
        return target
    if target is None:
        return ClassTarget(None)
    if isinstance(target, bool):
        raise TypeError("target must be a Target, an int class index or None, got a bool")
    if isinstance(target, int) or (isinstance(target, Sequence) and not isinstance(target, str)):
        return ClassTarget(target)
    if isinstance(target, Tensor) and target.dtype in (torch.int64, torch.int32) and target.ndim <= 1:
        return ClassTarget(target)
    if isinstance(target, str) and target.upper() in BRATS_LABELS:
        return BratsRegionTarget(target)
    raise TypeError(
        "target must be a voxplain Target (ClassTarget, SegmentationTarget, BratsRegionTarget), "
        f"an int class index, a BraTS region name or None; got {type(target).__name__}"
    )
