"""Blur IG, occlusion and XRAI: agreement with PAIR saliency / Captum, axioms, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models as tm
import voxplain
from voxplain.methods.blur_ig import BlurIG, gaussian_blur
from voxplain.methods.occlusion import Occlusion

saliency_core = pytest.importorskip("saliency.core")
captum_attr = pytest.importorskip("captum.attr")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def smooth_classifier(dims: int = 2, in_channels: int = 3, classes: int = 3, seed: int = 0) -> nn.Module:
    """A smooth (Softplus, average pooling) classifier: path integrals converge fast."""
    torch.manual_seed(seed)
    conv = _CONV[dims]
    return nn.Sequential(conv(in_channels, 6, 3, padding=1), nn.Softplus(), conv(6, 6, 3, padding=1),
                         nn.Softplus(), _AVG[dims](2), nn.Flatten(), nn.Linear(6 * 2**dims, classes)).eval()


def pair_gradients(model: nn.Module, cls: int):
    """PAIR's call_model_function for a channels-first torch classifier (inputs channels-last)."""

    def call(batch, call_model_args=None, expected_keys=None):
        x = torch.tensor(np.moveaxis(np.asarray(batch), -1, 1), dtype=torch.float32, requires_grad=True)
        out = model(x)[:, cls].sum()
        (grad,) = torch.autograd.grad(out, x)
        return {saliency_core.base.INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.numpy(), 1, -1)}

    return call


# --------------------------------------------------------------------------- blur IG


def test_blur_matches_scipy_in_1_2_3_dims():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(2, 1, 30), (1, 3, 20, 17), (1, 2, 9, 12, 7)]:
        x = rng.normal(size=shape)
        for sigma in [0.0, 0.01, 0.7, 2.5, 50.0]:
            ours = gaussian_blur(torch.tensor(x), sigma).numpy()
            ref = np.stack([ndimage.gaussian_filter(r, [0] + [sigma] * (len(shape) - 2), mode="constant")
                            for r in x])
            np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_blur_ig_matches_pair_2d():
    model = smooth_classifier(2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 20, 20)).astype(np.float64)
    ours = voxplain.explain(model, torch.tensor(x[None], dtype=torch.float32), 1,
                            methods=[BlurIG(max_sigma=10, steps=30)], batch_size=7)["blur_ig"][0].numpy()
    ref = saliency_core.BlurIG().GetMask(np.moveaxis(x, 0, -1), pair_gradients(model, 1), max_sigma=10,
                                         steps=30, batch_size=30)
    ref = np.moveaxis(ref, -1, 0)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


def test_blur_ig_equals_pair_in_float64_on_a_relu_net():
    """In float64 end to end the two agree to rounding; in float32 both carry ~1e-3 of float noise."""
    from voxplain import ClassTarget, Engine
    from voxplain.run import Run

    model = tm.classifier(2, in_channels=3).eval().double()
    x = gaussian_blur(torch.randn(1, 3, 20, 20, dtype=torch.float64), 1.5)
    with Engine(model, batch_size=6) as engine:
        target = ClassTarget(2).bind(engine.forward(x))
        ours = BlurIG(max_sigma=8, steps=16).attribute(Run(engine, x, target, torch.zeros(1, dtype=torch.long))).map

    def call(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(np.moveaxis(np.asarray(batch), -1, 1), requires_grad=True)
        (grad,) = torch.autograd.grad(model(t)[:, 2].sum(), t)
        return {saliency_core.base.INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.numpy(), 1, -1)}

    ref = saliency_core.BlurIG().GetMask(np.moveaxis(x[0].numpy(), 0, -1), call, max_sigma=8, steps=16,
                                         batch_size=5)
    np.testing.assert_allclose(ours[0].numpy(), np.moveaxis(ref, -1, 0), rtol=0, atol=1e-10 * np.abs(ref).max())


def blob_images(size: int = 24) -> torch.Tensor:
    """Two 2-channel images of smooth blobs (object-like content on a dark background)."""
    g = torch.arange(size) - size / 2 + 0.5
    r2 = g[:, None] ** 2 + g[None] ** 2
    x = torch.stack([torch.exp(-r2 / (2 * w**2)) for w in (4.0, 6.0)])[None] * torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    torch.manual_seed(0)
    return torch.cat([x, 0.5 * x.flip(-1) + 0.2 * gaussian_blur(torch.randn(1, 2, size, size), 3.0)])


@pytest.mark.parametrize("seed", [0, 1])
def test_blur_ig_completeness_at_default_steps(seed):
    model = smooth_classifier(2, in_channels=2, seed=seed)
    x = blob_images()
    attr = BlurIG()(model, x, 0)
    with torch.no_grad():
        expected = model(x)[:, 0] - model(gaussian_blur(x, 50.0))[:, 0]
    total = attr.flatten(1).sum(1)
    assert torch.allclose(total, expected, rtol=0.02, atol=0), (total, expected)


def test_blur_ig_3d_never_mixes_channels():
    model = smooth_classifier(3, in_channels=2)
    with torch.no_grad():
        model[0].weight[:, 1] = 0  # the score depends on channel 0 only
    torch.manual_seed(4)
    x = torch.randn(1, 2, 12, 12, 12)
    other = x.clone()
    other[:, 1] = torch.randn(1, 12, 12, 12) * 5
    method = BlurIG(max_sigma=6, steps=12)
    a, b = method(model, x, 0), method(model, other, 0)
    assert a[:, 1].abs().max() == 0
    assert a[:, 0].abs().max() > 0
    torch.testing.assert_close(a[:, 0], b[:, 0])


def test_blur_ig_batch_rows_are_independent():
    model = smooth_classifier(2, in_channels=1)
    x = torch.randn(3, 1, 12, 12)
    method = BlurIG(max_sigma=5, steps=8)
    together = method(model, x, 2, batch_size=5)
    alone = torch.cat([method(model, x[i:i + 1], 2) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{"max_sigma": 0}, {"max_sigma": -1.0}, {"steps": 0},
                                     {"steps": 2.5}, {"grad_step": 0}])
def test_blur_ig_bad_options(options):
    with pytest.raises(ValueError, match="must be a positive"):
        voxplain.create_method("blur_ig", options)


# --------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("dims,shape,window,stride,baseline", [
    (2, (2, 2, 13, 11), (4, 3), (2, 3), 0.3),
    (2, (1, 3, 10, 10), 5, None, 0.0),
    (3, (1, 2, 9, 8, 10), 3, 2, -0.5),
    (1, (2, 2, 17), 4, 3, 0.1),
])
def test_occlusion_matches_captum(dims, shape, window, stride, baseline):
    model = tm.classifier(dims, in_channels=shape[1]).eval()
    torch.manual_seed(5)
    x = torch.randn(shape)
    ours = Occlusion(window=window, stride=stride, baseline=baseline)(model, x, 1, batch_size=4)
    win = (window,) * dims if isinstance(window, int) else tuple(window)
    st = win if stride is None else ((stride,) * dims if isinstance(stride, int) else tuple(stride))
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(shape[1], *win),
                                                 strides=(1, *st), baselines=baseline, target=1)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_occlusion_segmentation_target_and_tensor_baseline():
    net = tm.segnet(3).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    baseline = torch.full((2, 1, 1, 1), 0.25)
    ours = Occlusion(window=4, stride=4, baseline=baseline)(net, x, voxplain.SegmentationTarget(2))
    ref = captum_attr.Occlusion(tm.SpatialMean(net)).attribute(
        x, sliding_window_shapes=(2, 4, 4, 4), strides=(1, 4, 4, 4), baselines=0.25, target=2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_occlusion_bad_options():
    model = tm.classifier(2).eval()
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="larger than the input"):
        Occlusion(window=9)(model, x)
    with pytest.raises(ValueError, match="must not exceed the window"):
        Occlusion(window=2, stride=3)(model, x)
    with pytest.raises(ValueError, match="one per spatial dim"):
        Occlusion(window=(2, 2, 2))(model, x)
    with pytest.raises(ValueError, match="does not broadcast"):
        Occlusion(window=2, baseline=torch.zeros(3, 8, 8))(model, x)


# --------------------------------------------------------------------------- XRAI

from voxplain.methods.segments import dilated_label_masks, felzenszwalb_regions  # noqa: E402
from voxplain.methods.xrai import XRAI  # noqa: E402


def _smooth(shape, sigma, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), (0,) + (sigma,) * (len(shape) - 1))


@pytest.mark.parametrize("radius,shape", [(3, (20, 23)), (2, (9, 8, 10)), (0, (7, 9))])
def test_dilated_label_masks_match_skimage(radius, shape):
    from skimage.morphology import ball, dilation, disk

    rng = np.random.default_rng(0)
    labels = rng.integers(2, 6, shape)
    labels[tuple(slice(1, 5) for _ in shape)] = 9
    masks = dilated_label_masks(labels, radius).toarray().astype(bool)
    footprint = (disk if len(shape) == 2 else ball)(radius)
    for row, value in zip(masks, np.unique(labels)):
        np.testing.assert_array_equal(row.reshape(shape), dilation(labels == value, footprint))


def _pair_xrai(image, attr, segments, algorithm, area_threshold):
    params = saliency_core.XRAIParameters(algorithm=algorithm, area_threshold=area_threshold,
                                          return_xrai_segments=True)
    out = saliency_core.XRAI().GetMaskWithDetails(np.moveaxis(image, 0, -1), None, segments=segments,
                                                  base_attribution=np.moveaxis(attr, 0, -1),
                                                  extra_parameters=params)
    return out.attribution_mask, out.segments


@pytest.fixture(scope="module")
def pair_segments():
    """An image and PAIR's Felzenszwalb segments of it (computed once)."""
    from saliency.core.xrai import _get_segments_felzenszwalb

    image = _smooth((3, 40, 36), 2, 0).astype(np.float32)
    return image, _get_segments_felzenszwalb(np.moveaxis(image, 0, -1))


@pytest.mark.parametrize("algorithm,area_threshold", [("full", 1.0), ("full", 0.3), ("fast", 1.0)])
def test_xrai_matches_pair_given_segments_and_base(pair_segments, algorithm, area_threshold):
    image, segments = pair_segments
    attr = _smooth((3, 40, 36), 3, 1)
    ref_map, ref_ranks = _pair_xrai(image, attr, segments, algorithm, area_threshold)
    model = tm.classifier(2, in_channels=3).eval()
    method = XRAI(segments=segments, base_attribution=attr, algorithm=algorithm, area_threshold=area_threshold)
    out = voxplain.explain_detailed(model, torch.tensor(image[None]), 0, methods=[method])
    ours, ranks = out.maps["xrai"][0, 0].numpy(), out.extras["xrai"]["ranks"][0].numpy()
    assert out.maps["xrai"].shape == (1, 1, 40, 36)
    np.testing.assert_array_equal(ranks, ref_ranks)
    assert np.abs(ours - ref_map).max() <= 1e-3 * np.abs(ref_map).max()
    assert ranks.max() > 5


def test_xrai_default_2d_segmentation_matches_pair():
    from saliency.core.xrai import _get_segments_felzenszwalb

    image = _smooth((3, 30, 26), 2, 2).astype(np.float32)
    ref = [m for m in _get_segments_felzenszwalb(np.moveaxis(image, 0, -1)) if m.any()]
    ours = felzenszwalb_regions(image).masks.toarray().astype(bool).reshape(-1, 30, 26)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    # and the whole method with automatic segments agrees with PAIR's
    attr = _smooth((3, 30, 26), 3, 3)
    ref_map, ref_ranks = _pair_xrai(image, attr, ref, "full", 1.0)  # PAIR's own segments, as above
    model = tm.classifier(2, in_channels=3).eval()
    out = voxplain.explain_detailed(model, torch.tensor(image[None]), 0, methods=[XRAI(base_attribution=attr)])
    np.testing.assert_array_equal(out.extras["xrai"]["ranks"][0].numpy(), ref_ranks)
    assert np.abs(out.maps["xrai"][0, 0].numpy() - ref_map).max() <= 1e-3 * np.abs(ref_map).max()


def test_xrai_default_base_is_ig_over_min_and_max_baselines():
    model = smooth_classifier(2, in_channels=2)
    x = torch.tensor(_smooth((2, 2, 16, 16), 1.5, 4), dtype=torch.float32)
    labels = np.arange(16)[:, None] // 4 * 4 + np.arange(16)[None] // 4  # 16 blocks of 4x4
    options = {"segments": labels, "min_pixel_diff": 1, "steps": 12}
    default = voxplain.explain(model, x, 1, methods=["xrai"], options={"xrai": options})["xrai"]
    ig = {b: voxplain.explain(model, x, 1, methods=["integrated_gradients"],
                              options={"integrated_gradients": {"baseline": b, "steps": 12}})["integrated_gradients"]
          for b in ("min", "max")}
    given = voxplain.explain(model, x, 1, methods=["xrai"],
                             options={"xrai": {**options, "base_attribution": (ig["min"] + ig["max"]) / 2}})["xrai"]
    torch.testing.assert_close(default, given)
    # a registered method as base
    grads = voxplain.explain(model, x, 1, methods=["vanilla_gradient"])["vanilla_gradient"]
    by_name = voxplain.explain(model, x, 1, methods=["xrai"],
                               options={"xrai": {**options, "base": "vanilla_gradient"}})["xrai"]
    from_map = voxplain.explain(model, x, 1, methods=["xrai"],
                                options={"xrai": {**options, "base_attribution": grads}})["xrai"]
    torch.testing.assert_close(by_name, from_map)


def test_xrai_3d_regions_tile_the_volume_with_decreasing_density():
    net = tm.segnet(3, in_channels=2).eval()
    x = torch.tensor(_smooth((2, 2, 16, 16, 16), 1.5, 5), dtype=torch.float32)
    method = XRAI(steps=6, segment_size=16, n_segments=(8, 16, 32), dilation_radius=1, min_pixel_diff=10)
    out = voxplain.explain_detailed(net, x, voxplain.SegmentationTarget(1), methods=[method])
    xmap, extras = out.maps["xrai"], out.extras["xrai"]
    assert xmap.shape == (2, 1, 16, 16, 16)
    for i in range(2):
        ranks, gains = extras["ranks"][i], extras["gains"][i]
        assert ranks.min() == 1 and set(ranks.unique().tolist()) == set(range(1, len(gains) + 1))
        assert len(gains) > 3
        # the greedy regions come in decreasing density; a leftover region (if any) comes last
        ranked = gains[:-1]
        assert bool((ranked[:-1] >= ranked[1:]).all())
        # each voxel carries the density of its region
        expected = gains.to(torch.float32)[ranks - 1]
        torch.testing.assert_close(xmap[i, 0], expected)
    # samples are explained independently
    alone = voxplain.explain(net, x[1:], voxplain.SegmentationTarget(1), methods=[method])["xrai"]
    torch.testing.assert_close(alone[0], xmap[1])


def test_xrai_bad_options():
    model = tm.classifier(2).eval()
    x = torch.randn(1, 2, 12, 12)
    with pytest.raises(ValueError, match="spatial shape"):
        XRAI(segments=np.zeros((12, 11), dtype=int), base_attribution=torch.zeros(1, 2, 12, 12))(model, x)
    with pytest.raises(ValueError, match="spatial shape"):
        XRAI(segments=[np.ones((12, 12), bool), np.ones((11, 12), bool)])(model, x)
    with pytest.raises(ValueError, match="base_attribution"):
        XRAI(segments=np.zeros((12, 12), dtype=int), base_attribution=torch.zeros(3, 12, 12))(model, x)
    with pytest.raises(ValueError, match="algorithm"):
        XRAI(algorithm="greedy")
    with pytest.raises(ValueError, match="area_threshold"):
        XRAI(area_threshold=0)
    with pytest.raises(ValueError, match="1D"):
        XRAI(base_attribution=torch.zeros(1, 2, 16))(tm.classifier(1).eval(), torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="unknown option"):
        voxplain.create_method("xrai", {"window": 3})


def test_top_fraction_keeps_the_highest_voxels():
    from voxplain.methods.xrai import top_fraction

    xmap = torch.arange(200, dtype=torch.float32).view(2, 1, 10, 10)
    keep = top_fraction(xmap, 0.08)
    assert keep.shape == xmap.shape and keep.flatten(1).sum(1).tolist() == [8, 8]
    assert bool(keep[0, 0, 9, 2:].all()) and not bool(keep[0, 0, 9, 1])
    with pytest.raises(ValueError, match="fraction"):
        top_fraction(xmap, 0)


@pytest.mark.parametrize("shape", [(3, 40, 48), (2, 12, 16, 20)])
@pytest.mark.parametrize("sigma", [0.0, 0.7, 12.0, 48.4])
def test_blur_slope_is_the_float64_forward_difference_to_float32_precision(shape, sigma):
    # the slope of the blur path is a difference of two nearly equal blurs over 0.01: taken as two
    # float32 blurs it carried 0.3-0.5% error at large sigma, and Blur IG differed from PAIR by 6%
    from scipy import ndimage

    from voxplain.methods.blur_ig import gaussian_blur_and_slope

    x = np.random.default_rng(3).random(shape).astype(np.float32)

    def blur64(c, s):
        return ndimage.gaussian_filter(c.astype(np.float64), s, mode="constant") if s > 0 else c.astype(np.float64)

    want_slope = np.stack([(blur64(c, sigma + 0.01) - blur64(c, sigma)) / 0.01 for c in x])
    want_points = np.stack([blur64(c, sigma) for c in x])
    points, slope = gaussian_blur_and_slope(torch.from_numpy(x)[None], torch.tensor([sigma], dtype=torch.float64), 0.01)
    assert slope.dtype == torch.float32 and points.dtype == torch.float32
    np.testing.assert_allclose(points[0].numpy(), want_points, atol=1e-6)
    np.testing.assert_allclose(slope[0].numpy(), want_slope, atol=1e-5 * max(np.abs(want_slope).max(), 1e-12))
