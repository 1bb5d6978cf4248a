"""Completeness of the IG-type maps: reported per sample, and a warning that names the likely cause."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import voxplain
from tiny_models import classifier, linear
from voxplain import SegmentationTarget, explain_detailed

KEYS = {"error", "attribution_sum", "score_difference"}


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _basic_unet():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    # MONAI's defaults: InstanceNorm and LeakyReLU; 32^2 keeps more than one voxel at the bottleneck
    return BasicUNet(spatial_dims=2, in_channels=2, out_channels=2, features=(4, 4, 4, 4, 4, 4)), \
        torch.randn(1, 2, 32, 32)


def test_default_ig_on_basic_unet_meets_completeness_or_names_instance_norm():
    net, x = _basic_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = explain_detailed(net, x, SegmentationTarget(1), ["integrated_gradients"])
    extras = out.extras["integrated_gradients"]
    error = extras["completeness"]["error"][0]
    said = [str(w.message) for w in caught if "completeness" in str(w.message)]
    if error <= 0.05:
        assert not said
    else:
        assert len(said) == 1 and "InstanceNorm2d" in said[0] and "baseline 'min' or 'blur'" in said[0]
        assert extras["warnings"] == said


def test_old_trapezoid_explosion_is_flagged():
    net, x = _basic_unet()
    with pytest.warns(RuntimeWarning, match=r"completeness error .*InstanceNorm2d x18.*rule 'riemann_trapezoid' "
                                            r"takes the gradient at the baseline itself"):
        out = explain_detailed(net, x, SegmentationTarget(1), ["integrated_gradients"],
                               {"integrated_gradients": {"rule": "riemann_trapezoid", "steps": 8}})
    info = out.extras["integrated_gradients"]["completeness"]
    # the gradient at the all-zero input is orders of magnitude above the gradient at x
    assert info["error"][0] > 100 and abs(info["attribution_sum"][0]) > 100 * abs(info["score_difference"][0])


def test_default_ig_on_a_batchnorm_unet_meets_completeness_silently():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8, 16), strides=(2, 2), norm="batch")
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # untrained BatchNorm is the identity in eval mode: give it statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(1, 2, 16, 16, 16)
    with no_warnings():
        out = explain_detailed(net, x, SegmentationTarget(1), ["integrated_gradients"])
    assert out.extras["integrated_gradients"]["completeness"]["error"][0] < 0.05
    assert "warnings" not in out.extras["integrated_gradients"]


def test_completeness_interface_and_values():
    torch.manual_seed(2)
    model, x, x0 = linear((2, 6, 6)), torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6)
    methods = ["integrated_gradients", "guided_ig", "smoothgrad_ig", "vanilla_gradient"]
    opts = {"integrated_gradients": {"steps": 4, "baseline": x0}, "guided_ig": {"steps": 5, "baseline": x0},
            "smoothgrad_ig": {"samples": 2, "base_options": {"steps": 3}}}
    with no_warnings():
        out = explain_detailed(model, x, [1, 2], methods, opts)
    with torch.no_grad():
        expected = (model(x) - model(x0))[[0, 1], [1, 2]]
    for name in ("integrated_gradients", "guided_ig"):
        info = out.extras[name]["completeness"]
        assert set(info) == KEYS and all(len(v) == 2 and all(isinstance(f, float) for f in v) for v in info.values())
        torch.testing.assert_close(torch.tensor(info["score_difference"], dtype=torch.float64), expected.double(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(info["attribution_sum"], dtype=torch.float64), out.maps[name].flatten(1).sum(1).double(),
                                   rtol=1e-5, atol=1e-6)
        assert max(info["error"]) < 1e-4  # exact on a linear model
    # Blur IG on few steps is far from complete: reported and said
    with pytest.warns(RuntimeWarning, match=r"blur_ig: completeness error .* likely cause: too few steps \(6; try 24\)"):
        blurred = explain_detailed(model, x, [1, 2], ["blur_ig"], {"blur_ig": {"max_sigma": 3.0, "steps": 6}})
    assert set(blurred.extras["blur_ig"]["completeness"]) == KEYS and blurred.extras["blur_ig"]["warnings"]
    # noisy copies are derived rows: SmoothGrad over IG reports no completeness of its own
    assert out.extras["smoothgrad_ig"] == {} and out.extras["vanilla_gradient"] == {}


def test_xrai_reports_the_completeness_of_its_base_ig():
    model, x = classifier(dims=2), torch.randn(1, 2, 16, 16)
    labels = (torch.arange(16)[:, None] // 4 * 4 + torch.arange(16)[None] // 4).numpy()
    out = explain_detailed(model, x, 1, ["xrai"], {"xrai": {"segments": labels, "min_pixel_diff": 1, "steps": 12}})
    info = out.extras["xrai"]["completeness"]
    assert set(info) == KEYS and len(info["error"]) == 1


def test_baseline_score_costs_at_most_one_forward():
    model, x = classifier(dims=2), torch.randn(1, 2, 12, 12)
    for rule, passes in (("gausslegendre", 3), ("riemann_trapezoid", 2), ("riemann_left", 2)):
        calls = []
        handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        try:
            explain_detailed(model, x, 0, ["integrated_gradients"], {"integrated_gradients": {"steps": 6, "rule": rule}},
                             batch_size=8)
        finally:
            handle.remove()
        # the first forward, one pass of all path points, and F(baseline) unless the path evaluates it
        assert calls == [1, 6, 1][:passes], (rule, calls)


def test_near_zero_score_difference_is_said_instead():
    torch.manual_seed(3)
    model = linear((1, 4, 4), classes=1)
    with torch.no_grad():
        model[1].bias.fill_(1e3)  # F about 1000: float32 rounds F(x) - F(0) to noise
    w = model[1].weight.detach().view(1, 1, 4, 4)
    x = torch.randn(1, 1, 4, 4)
    # F(x) - F(0) = 2e-5 in reals, below float32's spacing at 1000 (6e-5): the map (exact for a
    # linear model) sums to 2e-5, the scores differ by 0 or 6e-5
    x = x - (x * w).sum() / (w * w).sum() * w + 2e-5 * w / (w * w).sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = explain_detailed(model, x, 0, ["integrated_gradients"], {"integrated_gradients": {"steps": 4}})
    info = out.extras["integrated_gradients"]["completeness"]
    said = [str(w.message) for w in caught if "integrated_gradients" in str(w.message)]
    assert info["error"][0] > 0.05 and abs(info["score_difference"][0]) < 1e-4
    assert len(said) == 1 and "is near zero" in said[0] and "not meaningful" in said[0]
    assert "likely cause" not in said[0]
