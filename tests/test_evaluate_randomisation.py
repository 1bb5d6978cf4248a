"""Randomisation sanity checks: Adebayo et al.'s finding on a small trained model, mechanics in 2D/3D."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models as tm
from voxplain.evaluate.randomisation import (cascading_randomisation, map_similarity, random_logit,
                                             randomisable_layers)


def _shapes_data(n: int, size: int = 16, seed: int = 0):
    """Class 1: a bright disc, class 0: a dark disc, among random bright/dark squares."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for i in range(n):
        for _ in range(6):
            lo = torch.randint(0, size - 5, (2,), generator=g)
            x[i, 0, lo[0]:lo[0] + 4, lo[1]:lo[1] + 4] += float(torch.rand(1, generator=g)) * 1.6 - 0.8
        c = torch.randint(5, size - 5, (2,), generator=g).float()
        disc = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 12).float()
        x[i, 0] += disc if y[i] == 1 else -disc
    return x, y


def _deep_net(width: int = 16) -> nn.Sequential:
    """Five conv-ReLU layers (max-pooling after the first two), global average pool, linear."""
    torch.manual_seed(0)
    layers, c = [], 1
    for i in range(5):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < 2 else [])
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


@pytest.fixture(scope="module")
def trained():
    x, y = _shapes_data(256)
    model = _deep_net()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randperm(len(x), generator=gen)[:32]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _shapes_data(64, seed=1)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.9, f"the test model did not learn the task (accuracy {acc:.2f})"
    return model, xt[:4]


def test_cascading_randomisation_reproduces_adebayo(trained):
    model, x = trained
    before = copy.deepcopy(model.state_dict())
    methods = ["vanilla_gradient", "guided_backprop", "gradcam", "guided_gradcam"]
    res = cascading_randomisation(model, x, methods, seed=0)
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert res.stages[0] == "original" and res.stages[1] == "14"  # the linear layer is randomised first
    assert len(res.stages) == 7  # original + 5 convs + linear
    for m in methods:
        sp = res.similarity[m]["spearman_abs"][0]
        assert np.all(np.isnan(sp) | np.isclose(sp, 1.0))  # NaN where Grad-CAM is all zero (constant)
        np.testing.assert_allclose(res.similarity[m]["ssim"][0], 1.0)
    # mean similarity over the randomisation stages, averaged over the samples
    mean = {m: {k: float(np.nanmean(v[1:])) for k, v in res.similarity[m].items()} for m in methods}
    # guided backprop stays similar to the trained model's map, and so does guided Grad-CAM, unlike
    # the gradient and Grad-CAM; clearest on the signed maps (Adebayo et al. report both)
    signed = {m: mean[m]["spearman_signed"] for m in methods}
    assert signed["guided_backprop"] > signed["vanilla_gradient"] + 0.2, signed
    assert signed["guided_backprop"] > signed["gradcam"] + 0.2, signed
    assert signed["guided_gradcam"] > signed["gradcam"] + 0.2, signed
    for measure in ("spearman_abs", "ssim"):
        assert mean["guided_backprop"][measure] > mean["vanilla_gradient"][measure], (measure, mean)
        assert mean["guided_backprop"][measure] > mean["gradcam"][measure] + 0.1, (measure, mean)
        assert mean["guided_gradcam"][measure] > mean["gradcam"][measure] + 0.1, (measure, mean)
    # Grad-CAM changes as soon as the top layer is randomised; guided backprop does not
    top = res.similarity
    gbp1, gc1 = np.nanmean(top["guided_backprop"]["spearman_abs"][1]), np.nanmean(top["gradcam"]["spearman_abs"][1])
    assert gbp1 > gc1 + 0.1, (gbp1, gc1)
    assert np.mean(top["guided_backprop"]["spearman_abs"][1]) > 0.9, top["guided_backprop"]["spearman_abs"][1]
    # once every layer is random, the gradient no longer resembles the trained model's
    assert np.mean(top["vanilla_gradient"]["spearman_signed"][-1]) < 0.3


def test_random_logit_check(trained):
    model, x = trained
    out = random_logit(model, x, ["vanilla_gradient", "gradcam"], seed=0)
    assert set(out) == {"vanilla_gradient", "gradcam"}
    # with two classes the other logit is the negated evidence: Grad-CAM's map changes (or is all
    # zero after its ReLU, which makes the rank correlation undefined)
    sp = out["gradcam"]["spearman_abs"]
    assert all(np.isnan(v) or v < 0.5 for v in sp), sp
    assert out["vanilla_gradient"]["ssim"].shape == (4,)


@pytest.mark.parametrize("dims,shape", [(1, (16,)), (3, (12, 12, 12))])
def test_cascading_mechanics_other_dims(dims, shape):
    model = tm.classifier(dims, in_channels=2, classes=3)
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in randomisable_layers(model, x)]
    assert names == ["0", "1", "4", "5", "9"]  # conv, BN, conv, BN, linear in execution order
    assert [n for n, _ in randomisable_layers(model, x, include_norm=False)] == ["0", "4", "9"]
    res = cascading_randomisation(model, x, ["vanilla_gradient"], layers=["9", "4"], keep_maps=True,
                                  batch_size=1)
    assert res.stages == ["original", "9", "4"]
    assert res.similarity["vanilla_gradient"]["ssim"].shape == (3, 2)
    assert len(res.maps["vanilla_gradient"]) == 3
    assert model.training  # restored
    with pytest.raises(ValueError, match="not found in the model"):
        cascading_randomisation(model, x, ["vanilla_gradient"], layers=["nope"])
    d = res.as_dict()
    assert d["stages"] == res.stages


def test_map_similarity_degenerate_and_errors():
    a = torch.rand(2, 1, 8, 8)
    s = map_similarity(a, a)
    np.testing.assert_allclose(s["spearman_abs"], 1.0)
    np.testing.assert_allclose(s["ssim"], 1.0)
    z = torch.zeros(2, 1, 8, 8)
    s = map_similarity(a, z)
    assert np.isnan(s["spearman_abs"]).all()  # rank correlation with a constant map is undefined
    assert map_similarity(z, z)["ssim"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        map_similarity(a, torch.rand(2, 1, 8, 9))
    with pytest.raises(ValueError, match="classification target"):
        random_logit(tm.segnet(2), torch.rand(1, 2, 8, 8), ["vanilla_gradient"],
                     target=__import__("voxplain").SegmentationTarget(0))
