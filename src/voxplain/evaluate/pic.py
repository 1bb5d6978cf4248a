"""Performance information curves (PIC): AIC and SIC as in the XRAI paper, in 1, 2 and 3D.

Semantics follow PAIR's ``saliency.metrics`` (Kapishnikov et al. 2019), reimplemented
for (B, C, *spatial) tensors and batched model passes:

1. A *bottom* input keeps only a sparse random set of voxels (``random_mask``,
   ``random_fraction`` = 1 % by default) plus every corner of the volume, and fills
   the rest (``bottom="interpolate"``: linear interpolation between the kept voxels,
   ``scipy.interpolate.griddata``, the channel mean outside their hull, exactly as
   PAIR; ``bottom="blur"``: a Gaussian blur of the input with ``blur_sigma`` voxels,
   much faster on large volumes).
2. For each threshold t (fraction of most salient voxels, ascending), the voxels
   with saliency >= the (1 - t) quantile are revealed as well and the input is
   rebuilt the same way.
3. Each rebuilt input gets an *information* value (its compressed size, see
   below) and a model prediction; both are normalised between the bottom input
   (0) and the original (1) and clipped to [0, 1]; with ``keep_monotonous`` the
   prediction is its running maximum. The points (0, 0) and (1, 1) are added and
   the curve is linearly interpolated at ``num_points`` points on [0, 1) plus 1.
4. AUC by the trapezoid rule. Over cases the curve is aggregated by its median
   (:func:`aggregate_pic`).

The prediction is the softmax probability of the bound class for *SIC* and 1/0
for "the model's top class is the bound class" for *AIC* (for a single-logit output: the sign of the logit agrees with the
original's). AIC needs a (B, K)
classification output; SIC on other outputs uses the target's own score (choose
``output="probability"`` for a value in [0, 1]).

Information estimator (``estimator``): each channel is quantised to uint8 over
``value_range`` (default: the original input's per-channel min and max; values
outside are clipped). ``"webp"`` (default for 2D, as PAIR) is the size of the
lossless WebP encoding (grey for 1 channel, RGB for 3, else the sum over
channels); ``"zlib"`` (default for 1D and 3D) the size of the zlib level-9
compressed voxel bytes; ``"lzma"`` the LZMA-compressed size (closer to the
entropy, slower).

A case is *invalid* (``valid=False`` with a ``reason``; PAIR raises instead) when
the original prediction is below ``min_pred_value``, when the bottom input is
not less informative than the original, or when the bottom prediction is not
below the original one; invalid cases are left out of the aggregate.
"""

from __future__ import annotations

import io
import lzma
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import as_map, voxel_relevance
from ..methods.blur_ig import gaussian_blur
from ..run import Run, open_run

__all__ = ["PicResult", "AggregatePic", "pic_curves", "pic_on", "pic_metrics_on", "aggregate_pic", "sparse_fill",
           "information", "random_mask", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75)


@dataclass
class PicResult:
    """One case's PIC; curve_x/curve_y/auc are None when the case is invalid."""

    valid: bool
    reason: str = ""
    curve_x: np.ndarray | None = None
    curve_y: np.ndarray | None = None
    auc: float = float("nan")
    thresholds: list[float] = field(default_factory=list)
    predictions: list[float] = field(default_factory=list)  # bottom, thresholds..., original
    information: list[float] = field(default_factory=list)  # same order


@dataclass
class AggregatePic:
    """The aggregated curve over valid cases."""

    curve_x: np.ndarray
    curve_y: np.ndarray
    auc: float
    n_valid: int
    n_cases: int


def _trapz(y, x) -> float:
    f = getattr(np, "trapezoid", None) or np.trapz
    return float(f(y, x))


def random_mask(spatial: Sequence[int], fraction: float = 0.01, seed: int = 0) -> np.ndarray:
    """A bool mask with ``int(size * fraction)`` voxels set, chosen by a seeded RNG."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"random fraction must be in [0, 1], got {fraction}")
    size = int(np.prod(spatial))
    rng = np.random.default_rng(seed)
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, size=int(size * fraction), replace=False)] = True
    return mask.reshape(tuple(spatial))


def _with_corners(mask: np.ndarray) -> np.ndarray:
    mask = mask.copy()
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in mask.shape], indexing="ij")).reshape(mask.ndim, -1)
    mask[tuple(corners)] = True
    return mask


def sparse_fill(image: np.ndarray, keep: np.ndarray, bottom: str = "interpolate",
                blurred: np.ndarray | None = None) -> np.ndarray:
    """``image`` (C, *spatial) with the voxels outside ``keep`` (*spatial) filled in.

    ``"interpolate"``: linear interpolation from the kept voxels (corners always
    kept, channel mean outside their convex hull); ``"blur"``: ``blurred`` there.
    """
    keep = _with_corners(keep)
    if keep.all():
        return image.copy()
    if bottom == "blur":
        return np.where(keep[None], image, blurred).astype(image.dtype)
    from scipy import interpolate

    out = image * keep[None].astype(np.float32)
    known = np.argwhere(keep)
    unknown = np.argwhere(~keep)
    for c in range(image.shape[0]):
        values = image[c][tuple(known.T)]
        fill = float(np.mean(image[c]))
        if image.ndim == 2:  # one spatial axis: griddata needs 1-D coordinates
            filled = interpolate.griddata(known[:, 0], values, unknown[:, 0], method="linear", fill_value=fill)
        else:
            filled = interpolate.griddata(known, values, unknown, method="linear", fill_value=fill)
        out[c][tuple(unknown.T)] = filled
    return out.astype(image.dtype)


def _quantise(image: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (image.ndim - 1)
    scale = 255.0 / np.where(hi > lo, hi - lo, 1.0)
    q = (image - lo.reshape(shape)) * scale.reshape(shape)
    return np.clip(np.round(q), 0, 255).astype(np.uint8)


def information(image: np.ndarray, lo: np.ndarray, hi: np.ndarray, estimator: str = "auto") -> float:
    """Compressed size in bytes of ``image`` (C, *spatial) quantised to uint8 over [lo, hi] per channel."""
    q = _quantise(image, lo, hi)
    spatial = q.ndim - 1
    if estimator == "auto":
        estimator = "webp" if spatial == 2 else "zlib"
    if estimator == "webp":
        if spatial != 2:
            raise ValueError(f"the webp estimator needs 2D images, got {spatial} spatial dimension(s)")
        from PIL import Image

        planes = [q[0]] if q.shape[0] == 1 else [np.moveaxis(q, 0, -1)] if q.shape[0] == 3 else list(q)
        total = 0
        for plane in planes:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(plane)).save(buf, format="webp", lossless=True, quality=100)
            total += buf.tell()
        return float(total)
    if estimator == "zlib":
        return float(len(zlib.compress(q.tobytes(), 9)))
    if estimator == "lzma":
        return float(len(lzma.compress(q.tobytes())))
    raise ValueError(f"estimator must be 'auto', 'webp', 'zlib' or 'lzma', got {estimator!r}")


def _predictions(p: Run, rows: Tensor, sample: int, metric: str) -> np.ndarray:
    idx = torch.full((rows.shape[0],), sample, device=p.x.device, dtype=torch.long)
    classes = getattr(p.target, "classes", None)
    if metric == "sic":
        if p.output.ndim == 2 and classes is not None:
            out = p.forward(rows)
            prob = torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)
            return prob[:, int(classes[sample])].double().cpu().numpy()
        return p.scores(rows, idx).double().cpu().numpy()
    if p.output.ndim != 2 or classes is None:
        raise ValueError("AIC needs a classification model with a (B, K) output and a class target; "
                         f"the model's output has shape {tuple(p.output.shape)}")
    out = p.forward(rows)
    if out.shape[1] == 1:  # one logit: the decision is its sign, compared with the original's
        return ((out[:, 0] > 0) == bool(p.output[sample, 0] > 0)).double().cpu().numpy()
    return (out.argmax(dim=1) == int(classes[sample])).double().cpu().numpy()


def pic_on(p: Run, saliency, metric: str = "sic", **kwargs) -> list[PicResult]:
    """PIC for every sample with a prepared engine; see :func:`pic_curves`."""
    return pic_metrics_on(p, saliency, (metric,), **kwargs)[metric]


def pic_metrics_on(p: Run, saliency, metrics: Sequence[str] = ("sic", "aic"),
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS, random_masks=None,
                   random_fraction: float = 0.01, bottom: str = "auto", blur_sigma: float = 8.0,
                   estimator: str = "auto", value_range: tuple[float, float] | None = None,
                   min_pred_value: float = 0.0, keep_monotonous: bool = True, num_points: int = 1000,
                   reduce: str = "abs", seed: int = 0) -> dict[str, list[PicResult]]:
    """Several PIC kinds (``"sic"``, ``"aic"``) from one set of rebuilt inputs: ``{kind: results}``."""
    metrics = list(metrics)
    bad = [m for m in metrics if m not in ("sic", "aic")]
    if bad or not metrics:
        raise ValueError(f"metric must be 'sic' or 'aic', got {bad or metrics!r}")
    th = [float(t) for t in thresholds]
    if not th or any(not 0.0 <= t <= 1.0 for t in th) or any(b < a for a, b in zip(th, th[1:])):
        raise ValueError(f"thresholds must be ascending fractions in [0, 1], got {list(thresholds)}")
    x = p.x
    b, spatial = x.shape[0], tuple(x.shape[2:])
    if bottom == "auto":
        bottom = "interpolate" if len(spatial) <= 2 else "blur"
    if bottom not in ("interpolate", "blur"):
        raise ValueError(f"bottom must be 'auto', 'interpolate' or 'blur', got {bottom!r}")
    sal = as_map(saliency, "saliency")
    if sal.shape[0] != b or tuple(sal.shape[2:]) != spatial:
        raise ValueError(f"saliency of shape {tuple(sal.shape)} does not match the input {tuple(x.shape)}")
    sal = voxel_relevance(sal, reduce).double().numpy()
    if random_masks is None:
        masks = [random_mask(spatial, random_fraction, seed + i) for i in range(b)]
    else:
        rm = np.asarray(random_masks.cpu() if isinstance(random_masks, Tensor) else random_masks, dtype=bool)
        if rm.shape == spatial:
            rm = np.broadcast_to(rm, (b, *spatial))
        if rm.shape != (b, *spatial):
            raise ValueError(f"random_masks must have shape {(b, *spatial)} or {spatial}, got {rm.shape}")
        masks = list(rm)
    images = x.detach().cpu().numpy()
    blurred = gaussian_blur(x, blur_sigma).cpu().numpy() if bottom == "blur" else [None] * b
    results: dict[str, list[PicResult]] = {m: [] for m in metrics}
    for i in range(b):
        img = images[i]
        if value_range is None:
            axes = tuple(range(1, img.ndim))
            lo, hi = img.min(axis=axes), img.max(axis=axes)
        else:
            lo = np.full(img.shape[0], float(value_range[0]))
            hi = np.full(img.shape[0], float(value_range[1]))
        filled = [sparse_fill(img, masks[i], bottom, blurred[i])]
        for t in th:
            keep = (sal[i] >= np.quantile(sal[i], 1 - t)) | masks[i]
            filled.append(sparse_fill(img, keep, bottom, blurred[i]))
        filled.append(img)
        info = [information(f, lo, hi, estimator) for f in filled]
        rows = torch.from_numpy(np.stack(filled)).to(x.device, x.dtype)
        for m in metrics:
            preds = _predictions(p, rows, i, m)
            results[m].append(_curve(preds, info, th, min_pred_value, keep_monotonous, num_points))
    return results


def _curve(preds, info, th, min_pred_value, keep_monotonous, num_points) -> PicResult:
    base = dict(thresholds=[0.0] + th + [1.0], predictions=[float(v) for v in preds],
                information=[float(v) for v in info])
    p_bottom, p_orig = preds[0], preds[-1]
    i_bottom, i_orig = info[0], info[-1]
    if p_orig < min_pred_value:
        return PicResult(False, f"prediction on the original {p_orig:.4g} is below min_pred_value "
                                f"{min_pred_value}", **base)
    if i_bottom >= i_orig:
        return PicResult(False, f"the bottom input is not less informative than the original "
                                f"({i_bottom:.0f} >= {i_orig:.0f} bytes)", **base)
    if p_bottom >= p_orig:
        return PicResult(False, f"prediction on the bottom input {p_bottom:.4g} is not below the "
                                f"original's {p_orig:.4g}", **base)
    xs, ys = [], []
    best = 0.0
    for k in range(1, len(preds) - 1):
        e = float(np.clip((info[k] - i_bottom) / (i_orig - i_bottom), 0.0, 1.0))
        v = float(np.clip((preds[k] - p_bottom) / (p_orig - p_bottom), 0.0, 1.0))
        best = max(best, v)
        xs.append(e)
        ys.append(best if keep_monotonous else v)
    xs += [0.0, 1.0]
    ys += [0.0, 1.0]
    from scipy import interpolate

    f = interpolate.interp1d(xs, ys)
    curve_x = np.linspace(0.0, 1.0, num_points, endpoint=False)
    curve_y = np.asarray([f(v) for v in curve_x], dtype=np.float64)
    curve_x = np.append(curve_x, 1.0)
    curve_y = np.append(curve_y, 1.0)
    return PicResult(True, "", curve_x, curve_y, _trapz(curve_y, curve_x), **base)


def pic_curves(model: nn.Module, x, saliency, target=None, metric: str = "sic", device=None,
               batch_size: int | None = None, memory_budget=None, **kwargs) -> list[PicResult]:
    """SIC or AIC of ``model`` at ``x`` (B, C, *spatial) for a saliency map (B, C|1, *spatial).

    Keyword options (see the module docstring): ``thresholds``, ``random_masks``
    ((B, *spatial) or (*spatial) bool; default a seeded ``random_fraction`` of the
    voxels per case), ``bottom``, ``blur_sigma``, ``estimator``, ``value_range``,
    ``min_pred_value`` (default 0: keep every case), ``keep_monotonous``,
    ``num_points``, ``reduce`` (how the map becomes one saliency per voxel, default
    ``"abs"``), ``seed``. Returns one :class:`PicResult` per sample.
    """
    with open_run(model, x, target, device=device, batch_size=batch_size, memory_budget=memory_budget) as p:
        return pic_on(p, saliency, metric, **kwargs)


def aggregate_pic(results: Sequence[PicResult], method: str = "median") -> AggregatePic:
    """The median (or mean) curve over the valid cases and its AUC; NaN curve if none is valid."""
    if method not in ("median", "mean"):
        raise ValueError(f"method must be 'median' or 'mean', got {method!r}")
    valid = [r for r in results if r.valid]
    if not valid:
        return AggregatePic(np.array([]), np.array([]), float("nan"), 0, len(results))
    xs = valid[0].curve_x
    if any(len(r.curve_x) != len(xs) or not np.array_equal(r.curve_x, xs) for r in valid):
        raise ValueError("PIC results have different x-axis points (different num_points)")
    ys = np.stack([r.curve_y for r in valid])
    y = np.median(ys, axis=0) if method == "median" else ys.mean(axis=0)
    return AggregatePic(xs, y, _trapz(y, xs), len(valid), len(results))
