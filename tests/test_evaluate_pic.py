"""PIC (AIC/SIC): agreement with PAIR saliency.metrics in 2D, and 3D/1D runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from voxplain.evaluate.pic import aggregate_pic, information, pic_curves, random_mask, sparse_fill

pic_ref = pytest.importorskip("saliency.metrics.pic")


class RoundingNet(nn.Module):
    """Rounds its input first, so it sees exactly the uint8 images PAIR feeds its pred_func."""

    def __init__(self, channels: int, dims: int = 2, classes: int = 3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        torch.manual_seed(0)
        self.net = nn.Sequential(conv(channels, 4, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(),
                                 nn.Linear(4, classes))

    def forward(self, x):
        return self.net(torch.round(x) / 255.0)


class EdgeNet(nn.Module):
    """Two classes decided by high-frequency energy: a sharp image is class 1, a blurred one class 0."""

    def __init__(self, channels: int, threshold: float):
        super().__init__()
        self.lap = nn.Conv2d(channels, 1, 3, bias=False)
        with torch.no_grad():
            k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
            self.lap.weight.copy_(k.expand(1, channels, 3, 3) / channels)
        self.threshold = threshold

    def energy(self, x):
        e = self.lap(torch.round(x) / 255.0)
        return (torch.relu(e) + torch.relu(-e)).mean(dim=(1, 2, 3))

    def forward(self, x):
        z = 20.0 * (self.energy(x) - self.threshold)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _image(h=24, w=20, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = 120 + 80 * np.sin(yy / 3.0) * np.cos(xx / 4.0)
    img = np.stack([base + rng.normal(0, 20, (h, w)) for _ in range(channels)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("metric", ["sic", "aic"])
def test_pic_matches_pair_2d(channels, metric):
    img = _image(channels=channels, seed=channels)
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    rng = np.random.default_rng(3)
    rmask = np.zeros(img.shape[:2], bool)
    rmask.flat[rng.choice(rmask.size, 5, replace=False)] = True
    bottom = torch.from_numpy(sparse_fill(x[0].numpy(), rmask))[None]
    probe = EdgeNet(channels, 0.0)
    with torch.no_grad():
        sharp, smooth = float(probe.energy(x)), float(probe.energy(bottom))
    model = EdgeNet(channels, 0.5 * (sharp + smooth)).eval()
    cls = 1
    sal = rng.random(img.shape[:2])
    sal[6:14, 5:12] += 2.0
    thresholds = [0.01, 0.05, 0.1, 0.2, 0.4, 0.7]

    def pred_func(batch):
        t = torch.from_numpy(batch.astype(np.float32))
        t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
        with torch.no_grad():
            o = model(t)
        if metric == "sic":
            return torch.softmax(o, 1)[:, cls].numpy().tolist()
        return (o.argmax(1) == cls).float().numpy().tolist()

    ref = pic_ref.compute_pic_metric(img if channels == 3 else img[..., 0], sal, rmask, pred_func,
                                     thresholds, min_pred_value=0.0, keep_monotonous=True,
                                     num_data_points=200)
    ours = pic_curves(model, x, torch.from_numpy(sal)[None, None].float(), target=cls, metric=metric,
                      thresholds=thresholds, random_masks=rmask, bottom="interpolate",
                      estimator="webp", value_range=(0, 255), num_points=200, reduce="signed")[0]
    assert ours.valid, ours.reason
    np.testing.assert_allclose(ours.predictions, ref.predictions, atol=1e-6)
    np.testing.assert_allclose(ours.curve_x, ref.curve_x)
    np.testing.assert_allclose(ours.curve_y, ref.curve_y, atol=1e-6)
    assert abs(ours.auc - ref.auc) < 1e-6
    # the median aggregate agrees too
    agg = aggregate_pic([ours, ours])
    ref_agg = pic_ref.aggregate_individual_pic_results([ref, ref], method="median")
    assert abs(agg.auc - ref_agg.auc) < 1e-6


def test_sparse_fill_matches_pair():
    img = _image(channels=3)
    rmask = random_mask(img.shape[:2], 0.05, seed=1)
    ref = pic_ref.create_blurred_image(img.astype(np.float32), rmask)
    ours = sparse_fill(np.moveaxis(img.astype(np.float32), -1, 0), rmask)
    np.testing.assert_allclose(np.moveaxis(ours, 0, -1), ref, atol=1e-4)


def test_webp_information_matches_pair():
    img = _image(channels=1)[..., 0]
    ref = pic_ref.estimate_image_entropy(img)
    ours = information(img[None].astype(np.float32), np.zeros(1), np.full(1, 255.0), "webp")
    assert ours == ref


@pytest.mark.parametrize("dims", [1, 3])
def test_pic_runs_batched_in_other_dims(dims):
    shape = {1: (64,), 3: (16, 16, 16)}[dims]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, *shape, generator=g) * 255
    model = RoundingNet(2, dims).eval()
    sal = torch.rand(2, 1, *shape, generator=g)
    for bottom in ("blur", "interpolate") if dims == 1 else ("blur",):
        res = pic_curves(model, x, sal, metric="sic", bottom=bottom, num_points=50, batch_size=5)
        assert len(res) == 2
        for r in res:
            if r.valid:
                assert 0.0 <= r.auc <= 1.0 and r.curve_y[-1] == 1.0
            else:
                assert r.reason
        agg = aggregate_pic(res)
        assert agg.n_cases == 2


def test_pic_bad_input():
    model = RoundingNet(1).eval()
    x = torch.rand(1, 1, 12, 12) * 255
    with pytest.raises(ValueError, match="saliency"):
        pic_curves(model, x, torch.rand(1, 1, 10, 12))
    with pytest.raises(ValueError, match="thresholds"):
        pic_curves(model, x, torch.rand(1, 1, 12, 12), thresholds=[0.5, 0.1])
    with pytest.raises(ValueError, match="metric"):
        pic_curves(model, x, torch.rand(1, 1, 12, 12), metric="xyz")
    res = pic_curves(model, x, torch.rand(1, 1, 12, 12), min_pred_value=1.1)
    assert not res[0].valid and "min_pred_value" in res[0].reason
    assert np.isnan(aggregate_pic(res).auc)
