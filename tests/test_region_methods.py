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
